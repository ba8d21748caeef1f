using Vmsnap.Fuzz;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Fuzz;

/// <summary>
/// Replays every past finding kept in fuzz/regressions/TARGET/ through the fuzzing target that found it (the
/// same code the harness runs under afl-fuzz): each input must be accepted or refused with one of the
/// project's own errors, never crash.
/// </summary>
[Trait("Category", "Unit")]
public sealed class FuzzRegressions
{
    /// <summary>The folder of a target's kept findings in the repository.</summary>
    internal static string Folder(string target)
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "Vmsnap.slnx"))) dir = dir.Parent;
        if (dir is null) throw new InvalidOperationException("repository root (Vmsnap.slnx) not found above " + AppContext.BaseDirectory);
        return Path.Combine(dir.FullName, "fuzz", "regressions", target);
    }

    public static TheoryData<string, string> Findings()
    {
        var data = new TheoryData<string, string>();
        foreach (string target in FuzzTargets.All.Keys)
        {
            string folder = Folder(target);
            if (!Directory.Exists(folder)) continue;
            foreach (string file in Directory.GetFiles(folder).Order(StringComparer.Ordinal))
                data.Add(target, Path.GetFileName(file));
        }
        return data;
    }

    [Fact]
    public void Every_target_has_kept_findings()
    {
        foreach (string target in FuzzTargets.All.Keys)
            Assert.NotEmpty(Directory.GetFiles(Folder(target)));
    }

    [Theory]
    [MemberData(nameof(Findings))]
    public void A_kept_finding_is_accepted_or_refused_never_a_crash(string target, string file)
    {
        byte[] input = File.ReadAllBytes(Path.Combine(Folder(target), file));
        using var scratch = new TempDir();
        // Run rethrows anything but the project's own errors: that fails the test with the finding's stack.
        _ = FuzzTargets.Run(target, input, scratch.Path);
    }
}
