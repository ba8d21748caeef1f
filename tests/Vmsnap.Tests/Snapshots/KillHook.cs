using System.Globalization;
using Vmsnap.Storage;

/// <summary>
/// The kill tests' hook into a real vmsnap process: a .NET startup hook (the runtime calls
/// <see cref="Initialize"/> before the tool's Main when <c>DOTNET_STARTUP_HOOKS</c> names this test
/// assembly), active when <c>VMSNAP_TEST_HOOK_PAUSE_AT_IO</c> holds a number N. Every mutating operation
/// of a writable file device (write, flush, resize, discard, preallocation) is then counted, process-wide;
/// before the one numbered N (1-based) the process prints <c>vmsnap test hook: paused before I/O N</c> on
/// stderr and blocks that thread for good, so the test can kill it (SIGKILL) exactly there. With 0 it only
/// counts, and prints <c>vmsnap test hook: M I/O operations</c> when the process exits. The library keeps
/// only the seam, <see cref="FileBlockDevice.BeforeMutatingIo"/>.
/// </summary>
/// <remarks>The runtime requires this name, in no namespace.</remarks>
#pragma warning disable CA1050 // a startup hook must be in the global namespace
public static class StartupHook
#pragma warning restore CA1050
{
    internal const string PauseVariable = "VMSNAP_TEST_HOOK_PAUSE_AT_IO";

    private static long s_pauseAt;
    private static long s_count;

    /// <summary>Installs the counter when the variable is set; does nothing otherwise.</summary>
    public static void Initialize()
    {
        Vmsnap.Tests.Live.LiveKillHook.Install();
        string? value = Environment.GetEnvironmentVariable(PauseVariable);
        if (value is null || !long.TryParse(value, NumberStyles.None, CultureInfo.InvariantCulture, out s_pauseAt)) return;
        AppDomain.CurrentDomain.ProcessExit += (_, _) => Console.Error.WriteLine($"vmsnap test hook: {Interlocked.Read(ref s_count)} I/O operations");
        FileBlockDevice.BeforeMutatingIo = BeforeIo;
    }

    private static void BeforeIo()
    {
        long n = Interlocked.Increment(ref s_count);
        if (n != s_pauseAt) return;
        Console.Error.WriteLine($"vmsnap test hook: paused before I/O {n}");
        Console.Error.Flush();
        Thread.Sleep(Timeout.Infinite);
    }
}
