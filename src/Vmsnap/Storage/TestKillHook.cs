using System.Globalization;

namespace Vmsnap.Storage;

/// <summary>
/// Test hook for the kill tests (tests/Vmsnap.Tests/Snapshots/KillTests.cs), inert unless the
/// environment variable <c>VMSNAP_TEST_HOOK_PAUSE_AT_IO</c> holds a number when the process starts.
/// Then every mutating operation of a writable <see cref="FileBlockDevice"/> (write, flush, resize,
/// discard, preallocation) is counted, process-wide; before the one numbered N (1-based) the
/// process prints <c>vmsnap test hook: paused before I/O N</c> on stderr and blocks that thread
/// for good, so the test can kill it (SIGKILL) exactly there. With 0 it only counts, and prints
/// <c>vmsnap test hook: M I/O operations</c> when the process exits.
/// </summary>
internal static class TestKillHook
{
    internal const string Variable = "VMSNAP_TEST_HOOK_PAUSE_AT_IO";

    private static readonly long PauseAt = Configure();
    private static long s_count;

    /// <summary>True only when the variable is set (read once, at start).</summary>
    internal static readonly bool Enabled = PauseAt >= 0;

    private static long Configure()
    {
        string? value = Environment.GetEnvironmentVariable(Variable);
        if (value is null || !long.TryParse(value, NumberStyles.None, CultureInfo.InvariantCulture, out long n)) return -1;
        AppDomain.CurrentDomain.ProcessExit += (_, _) => Console.Error.WriteLine($"vmsnap test hook: {Interlocked.Read(ref s_count)} I/O operations");
        return n;
    }

    /// <summary>Counts one mutating device operation; blocks for good before the one the variable names.</summary>
    internal static void BeforeIo()
    {
        long n = Interlocked.Increment(ref s_count);
        if (n != PauseAt) return;
        Console.Error.WriteLine($"vmsnap test hook: paused before I/O {n}");
        Console.Error.Flush();
        Thread.Sleep(Timeout.Infinite);
    }
}
