using System.Text.RegularExpressions;
using Vmsnap.Tests.Interop;
using Vmsnap.Tests.Qcow2;

namespace Vmsnap.Tests.Cli;

/// <summary>
/// The exit codes <c>--help</c> documents are the ones vmsnap exits with: each documented code is
/// produced by a case here (130 and 143, by real signals, in <see cref="SignalTests"/>), and
/// <c>--output=json</c> is accepted wherever <c>--json</c> is.
/// </summary>
[Trait("Category", "Unit")]
public partial class ExitCodeTests
{
    private static Tool.Result Vmsnap(params string[] args) =>
        VmsnapCli.Run([.. args], TimeSpan.FromMinutes(2));

    [GeneratedRegex(@"^  (\d+) +(\S.*)$", RegexOptions.Multiline)]
    private static partial Regex ExitCodeLine();

    /// <summary>The "Exit codes:" section of a help text: code to meaning.</summary>
    private static Dictionary<int, string> Documented(string help)
    {
        int at = help.IndexOf("\nExit codes:\n", StringComparison.Ordinal);
        Assert.True(at >= 0, $"no exit codes in the help: {help}");
        return ExitCodeLine().Matches(help[at..]).ToDictionary(m => int.Parse(m.Groups[1].Value), m => m.Groups[2].Value);
    }

    [QemuFact]
    public void Help_lists_the_exit_codes_and_each_one_is_what_vmsnap_exits_with()
    {
        Tool.Result help = Vmsnap("--help");
        Assert.Equal(0, help.ExitCode);
        Dictionary<int, string> codes = Documented(help.Stdout);
        Assert.Equal([0, 1, 2, 130, 143], codes.Keys.Order());
        Assert.Contains("SIGINT", codes[130]);
        Assert.Contains("SIGTERM", codes[143]);
        // Every command's help has them too, with its own where it has some.
        Assert.Equal(codes, Documented(Vmsnap("save", "--help").Stdout));
        Dictionary<int, string> check = Documented(Vmsnap("check", "--help").Stdout);
        Assert.Equal([0, 1, 2, 3, 130, 143], check.Keys.Order());
        Assert.Contains("corruptions", check[2]);
        Assert.Contains("leaked", check[3]);

        using var dir = new TempDir();
        string image = dir.File("x.qcow2");
        Qemu.Create(image, 1 << 20);
        Assert.Equal(0, Vmsnap("info", image).ExitCode);
        Tool.Result failure = Vmsnap("info", dir.File("missing.qcow2"));
        Assert.Equal(1, failure.ExitCode);
        Assert.StartsWith("vmsnap: ", failure.Stderr);
        foreach (string[] usage in new[]
        {
            Array.Empty<string>(), ["nosuch"], ["info"], ["info", image, "--nosuch"], ["info", image, "--output=xml"],
            ["info", image, "--json", "--output=human"], ["check", image, "--repair", "everything"],
        })
        {
            Tool.Result r = Vmsnap(usage);
            Assert.True(r.ExitCode == 2, $"vmsnap {string.Join(' ', usage)}: exit {r.ExitCode}, {r.Stderr}");
            Assert.Single(r.Stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries));
            Assert.StartsWith("vmsnap: ", r.Stderr);
        }
        Assert.Contains("'nosuch'", Vmsnap("nosuch").Stderr);
    }

    [QemuFact]
    public void Output_json_is_accepted_wherever_json_is_and_prints_the_same()
    {
        using var dir = new TempDir();
        string image = dir.File("o.qcow2");
        Qemu.Create(image, 4 << 20);
        Qemu.Io(image, "write -P 7 0 64k");
        File.WriteAllBytes(dir.File("in.bin"), new byte[512]);
        foreach (string[] command in new[]
        {
            new[] { "info", image }, ["check", image], ["snapshot", "list", image], ["read", image, "0", "512", "--to", dir.File("out.bin")],
        })
        {
            Tool.Result json = Vmsnap([.. command, "--json"]), output = Vmsnap([.. command, "--output=json"]), spaced = Vmsnap([.. command, "--output", "json"]);
            Assert.True(json.ExitCode == 0 && output.ExitCode == 0 && spaced.ExitCode == 0, $"{string.Join(' ', command)}: {json.Stderr}{output.Stderr}{spaced.Stderr}");
            Assert.StartsWith("{", json.Stdout);
            Assert.Equal(json.Stdout, output.Stdout);
            Assert.Equal(json.Stdout, spaced.Stdout);
            Assert.DoesNotContain("{", Vmsnap([.. command, "--output=human"]).Stdout);
        }
        // Commands that change the image: --output=json gives their JSON.
        Assert.Contains("\"action\": \"created\"", Vmsnap("snapshot", "create", image, "s", "--output=json").Stdout);
        Assert.Contains("\"bytes\": 512", Vmsnap("write", image, "0", "--from", dir.File("in.bin"), "--output=json").Stdout);
        Assert.Contains("\"virtual-size\": 1048576", Vmsnap("create", dir.File("new.qcow2"), "1M", "--output=json").Stdout);
    }
}
