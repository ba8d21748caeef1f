using System.Text.Json;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Snapshots;

/// <summary>Shared steps of the save/load interop tests: the vmsnap tool as a process, and QEMU guests with a drive.</summary>
internal static class VmKit
{
    public const long RamBytes = 64 << 20;

    /// <summary>Runs the real vmsnap tool.</summary>
    public static Tool.Result Vmsnap(params string[] args) =>
        VmsnapCli.Run(args, TimeSpan.FromMinutes(3));

    /// <summary>Runs vmsnap, requires exit code 0 and returns its JSON (the args must ask for --json).</summary>
    public static JsonElement VmsnapJson(params string[] args)
    {
        Tool.Result r = Vmsnap(args);
        Assert.True(r.ExitCode == 0, $"vmsnap {string.Join(' ', args)} exited {r.ExitCode}: {r.Stderr}");
        return JsonDocument.Parse(r.Stdout).RootElement;
    }

    /// <summary>Runs vmsnap expecting a failure: non-zero exit, one line on stderr naming every word given.</summary>
    public static void VmsnapFails(string[] args, params string[] words)
    {
        Tool.Result r = Vmsnap(args);
        Assert.True(r.ExitCode != 0, $"vmsnap {string.Join(' ', args)} should have failed: {r.Stdout}");
        string[] lines = r.Stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.True(lines.Length == 1, $"stderr should be one line: {r.Stderr}");
        Assert.StartsWith("vmsnap: ", lines[0]);
        foreach (string w in words) Assert.Contains(w, lines[0], StringComparison.OrdinalIgnoreCase);
    }

    /// <summary>A qcow2 image made by qemu-img (1 GiB disk).</summary>
    public static string QemuImage(TempDir dir, string name = "vm.qcow2")
    {
        string path = dir.File(name);
        Tool.QemuImg("create", "-q", "-f", "qcow2", path, "1G");
        return path;
    }

    /// <summary>A file of <paramref name="bytes"/> zero bytes for QEMU to load RAM into.</summary>
    public static string EmptyRam(TempDir dir, string name, long bytes = RamBytes)
    {
        string path = dir.File(name);
        using (var f = File.Create(path)) f.SetLength(bytes);
        return path;
    }

    public static string[] Drive(string image) => ["-drive", $"file={image},if=none,id=d0,format=qcow2"];

    /// <summary>QEMU savevm of a paused guest with these machine arguments.</summary>
    public static void QemuSavevm(string[] machine, string image, string tag)
    {
        using var vm = QemuVm.Start([.. machine, .. Drive(image)], paused: true);
        string said = vm.Hmp($"savevm {tag}");
        Assert.True(said.Trim().Length == 0, $"savevm said: {said}");
        vm.Quit();
    }

    /// <summary>QEMU started with <c>-loadvm TAG</c> (paused): the RAM file of <paramref name="machine"/> then holds the snapshot's RAM.</summary>
    public static void QemuLoadvm(string[] machine, string image, string tag)
    {
        using var vm = QemuVm.Start([.. machine, .. Drive(image), "-loadvm", tag], paused: true);
        vm.Quit();
    }

    /// <summary>The snapshots qemu-img sees: name to (id, vm-state-size).</summary>
    public static Dictionary<string, (string Id, long VmStateSize)> QemuSnapshots(string image)
    {
        JsonElement info = JsonDocument.Parse(Tool.QemuImg("info", "--output=json", "-U", image)).RootElement;
        var result = new Dictionary<string, (string, long)>();
        if (info.TryGetProperty("snapshots", out JsonElement list))
            foreach (JsonElement s in list.EnumerateArray())
                result[s.GetProperty("name").GetString()!] = (s.GetProperty("id").GetString()!, s.GetProperty("vm-state-size").GetInt64());
        return result;
    }
}
