using System.Text.RegularExpressions;

namespace Vmsnap.Tests;

/// <summary>
/// The folders of the library are layers; a lower layer never names a higher one. The compiler enforces
/// it: tests/Layering builds each folder as its own assembly referencing only the layers below (part of
/// Vmsnap.slnx, so a violation fails the solution's build). These tests keep that check complete (every
/// folder is a layer project in the solution, no layer sees another's internals) and also scan the text,
/// doc comments included.
/// </summary>
[Trait("Category", "Unit")]
public partial class LayeringTests
{
    private static readonly Dictionary<string, string[]> s_forbidden = new()
    {
        ["Storage"] = ["Qcow2", "VmState", "Migration", "Snapshots", "Live"],
        ["Qcow2"] = ["VmState", "Migration", "Snapshots", "Live"],
        ["VmState"] = ["Qcow2", "Migration", "Snapshots", "Live"],
        ["Migration"] = ["Qcow2", "Snapshots", "Live"],
        // Live (a running QEMU over QMP) and Snapshots (files) sit side by side above Migration.
        ["Snapshots"] = ["Live"],
        ["Live"] = ["Snapshots"],
    };

    [GeneratedRegex(@"\bVmsnap\.(Storage|Qcow2|VmState|Migration|Snapshots|Live)\b")]
    private static partial Regex LayerReference();

    internal static string RepositoryRoot()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "Vmsnap.slnx"))) dir = dir.Parent;
        return dir?.FullName ?? throw new InvalidOperationException("repository root (Vmsnap.slnx) not found above " + AppContext.BaseDirectory);
    }

    [Fact]
    public void No_layer_references_a_layer_above_it()
    {
        string src = Path.Combine(RepositoryRoot(), "src", "Vmsnap");
        var violations = new List<string>();
        foreach (var (layer, forbidden) in s_forbidden)
        {
            string folder = Path.Combine(src, layer);
            Assert.True(Directory.Exists(folder), $"layer folder {folder} is missing");
            foreach (string file in Directory.EnumerateFiles(folder, "*.cs", SearchOption.AllDirectories))
                foreach (Match m in LayerReference().Matches(File.ReadAllText(file)))
                    if (forbidden.Contains(m.Groups[1].Value))
                        violations.Add($"{Path.GetRelativePath(src, file)} names Vmsnap.{m.Groups[1].Value}");
        }
        Assert.Empty(violations);
    }

    [Fact]
    public void Every_library_folder_is_compiled_as_a_layer_of_the_solution()
    {
        string root = RepositoryRoot();
        string solution = File.ReadAllText(Path.Combine(root, "Vmsnap.slnx"));
        var folders = Directory.EnumerateDirectories(Path.Combine(root, "src", "Vmsnap"))
            .Select(Path.GetFileName).Where(f => f is not ("bin" or "obj")).Order().ToList();
        Assert.Equal(s_forbidden.Keys.Order(), folders!);
        foreach (string? layer in folders)
        {
            string project = $"tests/Layering/{layer}/Vmsnap.Layer.{layer}.csproj";
            Assert.True(File.Exists(Path.Combine(root, project)), $"{project} is missing");
            Assert.Contains($"<Project Path=\"{project}\" />", solution);
            string text = File.ReadAllText(Path.Combine(root, project));
            foreach (string above in s_forbidden[layer!])
                Assert.DoesNotContain($"Vmsnap.Layer.{above}.csproj", text);
        }
    }

    [Fact]
    public void No_layer_sees_another_layers_internals()
    {
        string layering = Path.Combine(RepositoryRoot(), "tests", "Layering");
        foreach (string file in Directory.EnumerateFiles(layering, "*.props").Concat(Directory.EnumerateFiles(layering, "*.csproj", SearchOption.AllDirectories)))
        {
            var granted = Regex.Matches(File.ReadAllText(file), "<InternalsVisibleTo\\s+Include=\"([^\"]*)\"")
                .SelectMany(m => m.Groups[1].Value.Split(';', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries));
            Assert.All(granted, name => Assert.Equal("Vmsnap.Tests", name));
        }
    }
}
