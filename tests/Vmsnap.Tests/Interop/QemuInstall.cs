using System.Collections.Concurrent;
using System.Text.RegularExpressions;

namespace Vmsnap.Tests.Interop;

/// <summary>
/// One installed QEMU the interop tests run against: the distribution's (7.2, on PATH) and a second one
/// (10.0 from Debian 12's backports, unpacked by tests/install-deps.sh into tests/.deps/qemu-10.0, found
/// through <c>VMSNAP_QEMU10</c> or that folder). A test gets one from <see cref="QemuTheoryAttribute"/>; <see cref="Tool"/>
/// and <see cref="QemuVm"/> then start that version's qemu-img, qemu-io and qemu-system-x86_64. Each use
/// checks the binaries' own <c>--version</c>, so a test that says it ran 10.0 did. Missing: the test fails
/// (never skips), saying how to install it.
/// </summary>
internal sealed partial class QemuInstall
{
    /// <summary>
    /// The versions every interop test runs against, oldest first: the one place the list is written
    /// (<see cref="QemuTheoryAttribute"/> runs each test on each).
    /// </summary>
    public static readonly IReadOnlyList<QemuInstall> All = [new("7.2", binDir: null), new("10.0", binDir: FindQemu10())];

    private static readonly AsyncLocal<QemuInstall?> CurrentInstall = new();
    private static readonly ConcurrentDictionary<string, string> CheckedVersions = new();

    private readonly string? _binDir;

    private QemuInstall(string version, string? binDir)
    {
        Version = version;
        _binDir = binDir;
    }

    /// <summary>"7.2" or "10.0": the major.minor the binaries must report.</summary>
    public string Version { get; }

    /// <summary>The version of this test ([QemuTheory]); a test without one fails rather than quietly running one version.</summary>
    public static QemuInstall Current => CurrentInstall.Value ?? throw new InvalidOperationException(
        "this test starts a QEMU program without a QEMU version: every interop test runs on each version " +
        "([QemuTheory] with string version as its first parameter)");

    /// <summary>The install for "7.2" or "10.0".</summary>
    public static QemuInstall Get(string version) => All.FirstOrDefault(i => i.Version == version)
        ?? throw new ArgumentOutOfRangeException(nameof(version), version, $"tests know QEMU {string.Join(" and ", All)}");

    /// <summary>
    /// Makes <paramref name="version"/> the QEMU of this test (and of tasks it starts) until disposed: for a test that
    /// switches version on purpose (a stream one version writes and the other reads); [QemuTheory] sets the test's own.
    /// </summary>
    public static IDisposable Use(string version)
    {
        QemuInstall install = Get(version);
        install.Path("qemu-img");   // fails now, with the reason, if it is missing or the wrong version
        QemuInstall? previous = CurrentInstall.Value;
        CurrentInstall.Value = install;
        return new Restore(previous);
    }

    /// <summary>
    /// Makes <paramref name="install"/> the QEMU of the calling async flow ([QemuTheory]'s test case, before it runs the
    /// test); the caller's own flow is untouched once its async method returns.
    /// </summary>
    internal static void Enter(QemuInstall? install) => CurrentInstall.Value = install;

    /// <summary>
    /// Runs <paramref name="check"/> once with each QEMU version in use, for a test whose QEMU part is a small check
    /// after costly work that does not depend on QEMU; a failure names the version.
    /// </summary>
    internal static void OnEach(Action<QemuInstall> check)
    {
        foreach (QemuInstall install in All)
        {
            using var scope = Use(install.Version);
            try
            {
                check(install);
            }
            catch (Exception e)
            {
                throw new InvalidOperationException($"on {install}: {e.Message}", e);
            }
        }
    }

    private sealed class Restore(QemuInstall? previous) : IDisposable
    {
        public void Dispose() => CurrentInstall.Value = previous;
    }

    /// <summary>True for the programs this class chooses between versions.</summary>
    public static bool IsQemuProgram(string program) =>
        program is "qemu-img" or "qemu-io" or "qemu-nbd" or "qemu-system-x86_64";

    /// <summary>Machine type of the i440FX PC of this version (<c>pc-i440fx-7.2</c>, <c>pc-i440fx-10.0</c>).</summary>
    public string PcMachine => $"pc-i440fx-{Version}";

    /// <summary>Machine type of the Q35 PC of this version.</summary>
    public string Q35Machine => $"pc-q35-{Version}";

    /// <summary>True from QEMU <paramref name="major"/>.<paramref name="minor"/> on.</summary>
    public bool AtLeast(int major, int minor) => System.Version.Parse(Version) >= new System.Version(major, minor);

    /// <summary>
    /// True when this version's streams of <paramref name="machine"/> carry SWITCHOVER_START: QEMU 10.0+ writes it (migrate
    /// and savevm alike, measured on 10.0.2) for machine types 10.0+ and <c>none</c>, not for older machine types.
    /// </summary>
    public bool WritesSwitchoverStart(string machine) =>
        AtLeast(10, 0) && (machine == "none" || machine.EndsWith("-" + Version, StringComparison.Ordinal) || machine is "pc" or "q35");

    public override string ToString() => $"QEMU {Version}";

    /// <summary>Absolute path of one of this version's programs, checked to report this version.</summary>
    public string Path(string program)
    {
        string path;
        if (_binDir is null)
        {
            path = Tool.FindOnPath(program)
                ?? throw new InvalidOperationException(
                    $"'{program}' is not installed; interop tests need QEMU: tests/run.sh installs it (apt-get install -y qemu-utils qemu-system-x86)");
        }
        else
        {
            path = System.IO.Path.Combine(_binDir, program);
            if (!File.Exists(path))
                throw new InvalidOperationException(
                    $"QEMU {Version}'s '{program}' is not at {path}; tests/run.sh installs it (tests/install-deps.sh unpacks QEMU 10.0 from Debian 12's backports into tests/.deps)");
        }
        string reported = CheckedVersions.GetOrAdd(path, ReportedVersion);
        if (reported != Version && !reported.StartsWith(Version + ".", StringComparison.Ordinal))
            throw new InvalidOperationException($"{path} reports version {reported}, expected QEMU {Version}");
        return path;
    }

    private static string ReportedVersion(string path)
    {
        Tool.Result r = Tool.RunPath(path, ["--version"], TimeSpan.FromSeconds(30));
        Match m = VersionPattern().Match(r.Stdout);
        if (r.ExitCode != 0 || !m.Success)
            throw new InvalidOperationException($"{path} --version failed (exit {r.ExitCode}): {r.Stderr}{r.Stdout}");
        return m.Groups[1].Value;
    }

    [GeneratedRegex(@"version (\d+\.\d+\.\d+)")]
    private static partial Regex VersionPattern();

    private static string FindQemu10()
    {
        string? fromEnv = Environment.GetEnvironmentVariable("VMSNAP_QEMU10");
        if (!string.IsNullOrEmpty(fromEnv)) return fromEnv;
        return System.IO.Path.Combine(TestDeps.Folder, "qemu-10.0", "bin");
    }
}

/// <summary>Where tests/install-deps.sh puts what it downloads: tests/.deps of this checkout.</summary>
internal static class TestDeps
{
    public static string Folder { get; } = Locate();

    /// <summary>The guest kernel and its modules (<c>VMSNAP_GUEST</c> or tests/.deps/guest).</summary>
    public static string Guest
    {
        get
        {
            string? fromEnv = Environment.GetEnvironmentVariable("VMSNAP_GUEST");
            string dir = !string.IsNullOrEmpty(fromEnv) ? fromEnv : System.IO.Path.Combine(Folder, "guest");
            if (!File.Exists(System.IO.Path.Combine(dir, "vmlinuz")))
                throw new InvalidOperationException($"the test guest's kernel is not in {dir}; tests/run.sh downloads it (tests/install-deps.sh)");
            return dir;
        }
    }

    private static string Locate()
    {
        for (string? dir = AppContext.BaseDirectory; dir is not null; dir = System.IO.Path.GetDirectoryName(dir))
            if (File.Exists(System.IO.Path.Combine(dir, "Vmsnap.slnx")))
                return System.IO.Path.Combine(dir, "tests", ".deps");
        return System.IO.Path.Combine(AppContext.BaseDirectory, ".deps");
    }
}
