using System.Text.Json;
using Vmsnap.Tests.Cli;
using Vmsnap.Tests.Interop;
using Vmsnap.Tests.Live;
using static Vmsnap.Tests.Snapshots.VmKit;

namespace Vmsnap.Tests.Native;

/// <summary>
/// The .deb (packaging/build-deb.sh) in a clean Debian 12 without .NET: apt installs it, the native vmsnap it
/// holds works there (images, snapshots, a running guest's save, live where <see cref="LiveKit.LiveSaveRestoresExactly"/>,
/// and restore, judged by real QEMU outside the root), and apt removes it again. Tier Guest: one test boots the guest.
/// </summary>
[Trait("Category", "Guest")]
public class DebianPackageTests(DebianPackageTests.InstalledRoot installed) : IClassFixture<DebianPackageTests.InstalledRoot>
{
    /// <summary>The files the package installs.</summary>
    private static readonly string[] Files =
    [
        "/usr/bin/vmsnap",
        "/usr/share/man/man1/vmsnap.1.gz",
        "/usr/share/bash-completion/completions/vmsnap",
        "/usr/share/doc/vmsnap/copyright",
        "/usr/share/doc/vmsnap/changelog.gz",
    ];

    /// <summary>One clean root with the package installed by apt, for the tests that use it.</summary>
    public sealed class InstalledRoot : IDisposable
    {
        public InstalledRoot()
        {
            Root = DebianRoot.Unpack();
            try
            {
                Install(Root);
            }
            catch
            {
                Root.Dispose();
                throw;
            }
        }

        internal DebianRoot Root { get; }

        public void Dispose() => Root.Dispose();
    }

    /// <summary><c>apt install ./vmsnap_VERSION_amd64.deb</c> in the root.</summary>
    private static void Install(DebianRoot root)
    {
        string name = Path.GetFileName(DebianRoot.Package);
        File.Copy(DebianRoot.Package, root.HostPath("/tmp/" + name));
        root.Check(["apt-get", "install", "-y", "--no-install-recommends", "./" + name], cwd: "/tmp");
    }

    [Fact]
    public void Apt_installs_the_package_into_a_clean_Debian_12_without_dotnet_and_removes_it()
    {
        using DebianRoot root = DebianRoot.Unpack();
        // No .NET anywhere in the root.
        Assert.NotEqual(0, root.Run(["sh", "-c", "command -v dotnet"]).ExitCode);
        Assert.Equal("", root.Check(["find", "/", "-xdev", "(", "-name", "libcoreclr.so", "-o", "-name", "System.Private.CoreLib.dll", "-o", "-name", "dotnet", ")", "-print"]));

        Install(root);
        string listed = root.Check(["dpkg", "-L", "vmsnap"]);
        foreach (string f in Files) Assert.Contains(f + "\n", listed);
        Assert.Equal("install ok installed", root.Check(["dpkg-query", "-W", "-f", "${Status}", "vmsnap"]));

        // The executable is the package's version, and runs.
        string version = root.Check(["dpkg-query", "-W", "-f", "${Version}", "vmsnap"]);
        Assert.Equal(version, root.Check(["vmsnap", "--version"]).Trim().Split('+')[0]);
        Assert.Contains("Exit codes:", root.Check(["vmsnap", "--help"]));

        // The manual page and the completion script are what the installed vmsnap writes from its command definitions.
        Assert.Equal(root.Check(["vmsnap", "--help-man"]), root.Check(["zcat", "/usr/share/man/man1/vmsnap.1.gz"]));
        Assert.Equal(root.Check(["vmsnap", "--help-bash-completion"]), File.ReadAllText(root.HostPath("/usr/share/bash-completion/completions/vmsnap")));

        // The licence is the repository's (its text, indented as Debian's copyright format has it), and the changelog names this version.
        string copyright = File.ReadAllText(root.HostPath("/usr/share/doc/vmsnap/copyright"));
        Assert.StartsWith("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/", copyright);
        Assert.Contains("License: MIT\n", copyright);
        string licence = File.ReadAllText(Path.Combine(TestDeps.Folder, "..", "..", "LICENSE"));
        string terms = licence[licence.IndexOf("Permission is hereby granted", StringComparison.Ordinal)..];
        Assert.Contains(Words(terms), Words(copyright));
        Assert.StartsWith($"vmsnap ({version}) ", root.Check(["zcat", "/usr/share/doc/vmsnap/changelog.gz"]));

        root.Check(["apt-get", "remove", "-y", "vmsnap"]);
        foreach (string f in Files) Assert.False(File.Exists(root.HostPath(f)), $"{f} is still there after apt remove");
        Assert.NotEqual(0, root.Run(["sh", "-c", "command -v vmsnap"]).ExitCode);
        Tool.Result status = root.Run(["dpkg-query", "-W", "-f", "${Status}", "vmsnap"]);
        Assert.DoesNotContain("installed", status.Stdout.Replace("not-installed", "", StringComparison.Ordinal));
    }

    [QemuFact]
    public void The_installed_vmsnap_creates_saves_and_loads_and_its_info_json_is_qemu_imgs()
    {
        using var dir = new TempDir();
        string image = dir.File("vm.qcow2"), ram = dir.File("ram0"), loaded = dir.File("loaded");
        GuestRam.Create(ram, RamBytes, seed: 61);

        Vmsnap(dir, "create", image, "1G");
        Qcow2.Qemu.Io(image, "write -P 0x5a 0 1M");
        Vmsnap(dir, "save", image, "--name", "saved", "--machine", "none", "--ram", $"ram0={ram}");
        QemuImgCheck.AssertClean(image);

        // QEMU restores what the native vmsnap saved, and the native vmsnap loads it back.
        string restored = EmptyRam(dir, "restored");
        QemuLoadvm(QemuVm.MachineNone(restored, RamBytes), image, "saved");
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(restored));
        Vmsnap(dir, "load", image, "saved", "--ram", $"ram0={loaded}");
        Assert.Equal(GuestRam.Hash(ram), GuestRam.Hash(loaded));

        // info --output=json: qemu-img's keys and values, vmsnap's own keys besides.
        JsonElement theirs = JsonDocument.Parse(Tool.QemuImg("info", "--output=json", image)).RootElement;
        JsonElement ours = JsonDocument.Parse(Vmsnap(dir, "info", "--output=json", image)).RootElement;
        QemuImgJsonTests.AssertLikeQemu(theirs, ours, "info", QemuImgJsonTests.InfoOwnKeys);
    }

    [QemuFact]
    public void The_installed_vmsnap_saves_a_running_guest_and_restores_it_with_loadvm()
    {
        bool live = LiveKit.LiveSaveRestoresExactly;   // restored and checked below: stopped on QEMU 7.2
        using var dir = new TempDir();
        SaveWindow window;
        using (TestGuest guest = TestGuest.Boot(dir))
        {
            guest.WaitForTick(t => t.N >= 3);
            GuestTick before = guest.LastTick();
            JsonElement saved = JsonDocument.Parse(Vmsnap(dir, ["savevm", "--qmp", guest.VmsnapSocket, "live", .. live ? new[] { "--live" } : [], "--json"])).RootElement;
            long returned = guest.LastTick().N;
            window = new SaveWindow(before.N, guest.WaitForTick(t => t.N > returned).N, before.Boot);
            Assert.Equal(live, saved.GetProperty("live").GetBoolean());
            Assert.Equal("running", saved.GetProperty("run-state").GetString());
            Assert.Equal(guest.Disks[0], saved.GetProperty("disks")[0].GetProperty("image").GetString());
            guest.Vm.Quit();
        }
        foreach (string disk in new[] { dir.File("disk0.qcow2"), dir.File("disk1.qcow2") }) QemuImgCheck.AssertClean(disk);

        using (TestGuest restored = TestGuest.Restart(dir, new GuestOptions(), "-incoming", "defer"))
        {
            JsonElement loaded = JsonDocument.Parse(Vmsnap(dir, "loadvm", "--qmp", restored.VmsnapSocket, "live", "--json")).RootElement;
            Assert.Equal("running", loaded.GetProperty("run-state").GetString());
            LiveKit.AssertResumes(restored, window);
            restored.Vm.Quit();
        }
    }

    /// <summary>Runs the root's /usr/bin/vmsnap with <paramref name="dir"/> shared and as its working folder; requires exit 0, returns stdout.</summary>
    private string Vmsnap(TempDir dir, params string[] args) =>
        installed.Root.Check(["vmsnap", .. args], share: [dir.Path], cwd: dir.Path);

    private static string Words(string text) => string.Join(' ', text.Split((char[])[' ', '\n', '\r', '.'], StringSplitOptions.RemoveEmptyEntries));
}
