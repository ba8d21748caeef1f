using System.Diagnostics;
using System.IO.Compression;
using System.Text;
using System.Text.Json;
using System.Xml.Linq;
using Vmsnap.Tests.Interop;
using Vmsnap.Tests.Qcow2;

namespace Vmsnap.Tests.Cli;

/// <summary>
/// <c>dotnet pack</c> of the two shipped projects, as the README's install line does it: the tool
/// package installs into a tool path from a folder source alone (no other NuGet source, so it works
/// offline) and the installed <c>vmsnap</c> makes an image qemu-img checks clean; the library package
/// has its id, README, licence, XML docs, repository commit and no machine's paths in its binary.
/// </summary>
[Trait("Category", "Interop")]
public class PackagingTests
{
    private static readonly string Repo = FindRepo();

    private static string FindRepo()
    {
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
            if (File.Exists(Path.Combine(d.FullName, "Vmsnap.slnx"))) return d.FullName;
        throw new InvalidOperationException($"no Vmsnap.slnx above {AppContext.BaseDirectory}");
    }

    /// <summary>Runs a program in <paramref name="cwd"/> with the environment changes given; fails unless it exits 0.</summary>
    private static string Run(string cwd, IDictionary<string, string> env, string program, params string[] args)
    {
        var psi = new ProcessStartInfo(program.Contains('/') ? program : Tool.Find(program))
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
            WorkingDirectory = cwd,
        };
        foreach (string a in args) psi.ArgumentList.Add(a);
        foreach (var (k, v) in env) psi.Environment[k] = v;
        using var p = Tool.Start(psi);
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(TimeSpan.FromMinutes(8)))
        {
            p.Kill(entireProcessTree: true);
            throw new TimeoutException($"{program} {string.Join(' ', args)} did not finish in time");
        }
        p.WaitForExit();
        Assert.True(p.ExitCode == 0, $"{program} {string.Join(' ', args)} exited {p.ExitCode}:\n{stdout.Result}\n{stderr.Result}");
        return stdout.Result;
    }

    private static XElement Nuspec(ZipArchive package, out XNamespace ns)
    {
        ZipArchiveEntry entry = package.Entries.Single(e => e.FullName.EndsWith(".nuspec", StringComparison.Ordinal) && !e.FullName.Contains('/'));
        using Stream s = entry.Open();
        XElement root = XDocument.Load(s).Root!;
        ns = root.Name.Namespace;
        return root.Element(ns + "metadata")!;
    }

    private static string Text(ZipArchive package, string path)
    {
        ZipArchiveEntry? entry = package.GetEntry(path);
        Assert.True(entry is not null, $"the package has no {path}: {string.Join(", ", package.Entries.Select(e => e.FullName))}");
        using var reader = new StreamReader(entry.Open(), Encoding.UTF8);
        return reader.ReadToEnd();
    }

    private static byte[] Bytes(ZipArchive package, string path)
    {
        using var copy = new MemoryStream();
        using (Stream s = package.GetEntry(path)!.Open()) s.CopyTo(copy);
        return copy.ToArray();
    }

    [Fact]
    public void The_packed_tool_installs_from_the_artifacts_folder_alone_and_runs_and_the_library_package_is_complete()
    {
        using var dir = new TempDir();
        string artifacts = dir.File("artifacts");
        var env = new Dictionary<string, string>
        {
            ["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1",
            ["DOTNET_NOLOGO"] = "1",
            ["MSBUILDDISABLENODEREUSE"] = "1",
        };
        // The projects were restored when the tests were built: packing needs no NuGet source.
        foreach (string project in new[] { "src/Vmsnap.Cli", "src/Vmsnap" })
            Run(Repo, env, "dotnet", "pack", Path.Combine(Repo, project), "-c", "Release", "--no-restore", "-o", artifacts, "-nodeReuse:false");
        string version = Path.GetFileNameWithoutExtension(Directory.GetFiles(artifacts, "vmsnap.*.nupkg").Single())["vmsnap.".Length..];

        // The tool package.
        using (ZipArchive tool = ZipFile.OpenRead(Path.Combine(artifacts, $"vmsnap.{version}.nupkg")))
        {
            XElement m = Nuspec(tool, out XNamespace ns);
            Assert.Equal("vmsnap", m.Element(ns + "id")!.Value);
            Assert.Equal("DotnetTool", m.Element(ns + "packageTypes")!.Element(ns + "packageType")!.Attribute("name")!.Value);
            Assert.Equal("MIT", m.Element(ns + "license")!.Value);
            Assert.Contains("dotnet tool install", Text(tool, m.Element(ns + "readme")!.Value));
            XElement settings = XDocument.Parse(Text(tool, "tools/net10.0/any/DotnetToolSettings.xml")).Root!;
            Assert.Equal("vmsnap", settings.Descendants("Command").Single().Attribute("Name")!.Value);
        }

        // Installed into a tool path from a nuget.config that lists only the artifacts folder.
        File.WriteAllText(dir.File("nuget.config"), $"""
            <?xml version="1.0" encoding="utf-8"?>
            <configuration>
              <packageSources>
                <clear />
                <add key="artifacts" value="{artifacts}" />
              </packageSources>
            </configuration>
            """);
        string tools = dir.File("tools");
        // A NuGet cache of its own: a package of the same version from an earlier run must not stand in for this one.
        var installEnv = new Dictionary<string, string>(env) { ["NUGET_PACKAGES"] = dir.File("nuget-packages") };
        Run(dir.Path, installEnv, "dotnet", "tool", "install", "--tool-path", tools, "--configfile", dir.File("nuget.config"), "--add-source", artifacts, "vmsnap");
        string vmsnap = Path.Combine(tools, "vmsnap");
        var runEnv = new Dictionary<string, string> { ["DOTNET_ROOT"] = Path.GetDirectoryName(new FileInfo(Tool.Find("dotnet")).ResolveLinkTarget(true)?.FullName ?? Tool.Find("dotnet"))! };
        Assert.StartsWith(version, Run(dir.Path, runEnv, vmsnap, "--version").Trim());
        string image = dir.File("from-tool.qcow2");
        JsonElement created = JsonDocument.Parse(Run(dir.Path, runEnv, vmsnap, "create", image, "64M", "--json")).RootElement;
        Assert.Equal(64 << 20, created.GetProperty("virtual-size").GetInt64());
        Run(dir.Path, runEnv, vmsnap, "snapshot", "create", image, "from-the-tool");
        JsonElement info = JsonDocument.Parse(Run(dir.Path, runEnv, vmsnap, "info", image, "--output=json")).RootElement;
        // What the installed tool made, as each QEMU sees it (packing once is enough: it does not depend on QEMU).
        QemuInstall.OnEach(_ =>
        {
            Assert.Equal(Qemu.Info(image).GetProperty("virtual-size").GetInt64(), info.GetProperty("virtual-size").GetInt64());
            Assert.Equal("from-the-tool", Qemu.Info(image).GetProperty("snapshots")[0].GetProperty("name").GetString());
            QemuImgCheck.AssertClean(image);
        });

        // The library package.
        using ZipArchive lib = ZipFile.OpenRead(Path.Combine(artifacts, $"Vmsnap.Core.{version}.nupkg"));
        XElement meta = Nuspec(lib, out XNamespace n);
        Assert.Equal("Vmsnap.Core", meta.Element(n + "id")!.Value);
        Assert.Equal(version, meta.Element(n + "version")!.Value);
        XElement license = meta.Element(n + "license")!;
        Assert.Equal("expression", license.Attribute("type")!.Value);
        Assert.Equal("MIT", license.Value);
        Assert.Contains("Qcow2Image", Text(lib, meta.Element(n + "readme")!.Value));
        Assert.False(string.IsNullOrWhiteSpace(meta.Element(n + "description")!.Value));
        Assert.Contains(meta.Element(n + "dependencies")!.Descendants(n + "dependency"), d => d.Attribute("id")!.Value == "ZstdSharp.Port");
        XElement repository = meta.Element(n + "repository")!;
        Assert.Equal("git", repository.Attribute("type")!.Value);
        if (Directory.Exists(Path.Combine(Repo, ".git")) || File.Exists(Path.Combine(Repo, ".git")))
            Assert.Equal(Run(Repo, env, "git", "rev-parse", "HEAD").Trim(), repository.Attribute("commit")!.Value);
        XDocument docs = XDocument.Parse(Text(lib, "lib/net10.0/Vmsnap.Core.xml"));
        Assert.Contains(docs.Descendants("member"), e => e.Attribute("name")!.Value == "T:Vmsnap.Qcow2.Qcow2Image");
        byte[] dll = Bytes(lib, "lib/net10.0/Vmsnap.Core.dll");
        Assert.True(dll.Length > 100_000);
        Assert.Equal(-1, dll.AsSpan().IndexOf(Encoding.UTF8.GetBytes(Repo)));   // reproducible: source paths mapped to /_/
        Assert.True(File.Exists(Path.Combine(artifacts, $"Vmsnap.Core.{version}.snupkg")));
    }
}
