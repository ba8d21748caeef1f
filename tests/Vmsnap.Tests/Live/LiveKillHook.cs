using System.Globalization;
using Vmsnap.Live;
using Vmsnap.Storage;

namespace Vmsnap.Tests.Live;

/// <summary>
/// The live kill tests' hook into a real vmsnap process, installed by the test assembly's startup hook
/// (<c>DOTNET_STARTUP_HOOKS</c>, see <c>KillHook.cs</c>) when <see cref="PauseVariable"/> is set: <c>PHASE</c> stops the
/// thread that reaches the live save's phase mark PHASE (<see cref="LiveTrace"/>: "settings applied", "guest stopped",
/// "migration completed", "images opened", "region checked", "snapshots committed", "resumed", "settings restored"), and
/// <c>PHASE+N</c> the thread that makes the Nth write, flush or resize of a file after it. The process prints
/// <c>vmsnap test hook: paused at PHASE[+N]</c> on stderr and that thread blocks for good, so the test can kill the
/// process (SIGKILL) exactly there. With <see cref="FailReadsVariable"/> set to a phase instead, every read of the snapshot a
/// postcopy load serves fails from that phase on (an <see cref="IOException"/>, as an unreadable image file gives); with
/// <see cref="SlowReadsVariable"/>, each of those reads takes <see cref="SlowReadMs"/> longer from that phase on (a slow disk,
/// so that a test has the time to do something while pages are still served), and the process prints <see cref="SlowedLine"/>.
/// The library keeps only the seams (<see cref="LiveTrace.AtMark"/>, <see cref="LiveTrace.BeforeServedRead"/>,
/// <see cref="FileBlockDevice.BeforeMutatingIo"/>).
/// </summary>
public static class LiveKillHook
{
    internal const string PauseVariable = "VMSNAP_TEST_HOOK_PAUSE_AT_PHASE";
    internal const string PausedLine = "vmsnap test hook: paused at ";
    internal const string FailReadsVariable = "VMSNAP_TEST_HOOK_FAIL_READS_AT_PHASE";
    internal const string InjectedReadFailure = "test hook: injected read failure";
    internal const string SlowReadsVariable = "VMSNAP_TEST_HOOK_SLOW_READS_AT_PHASE";
    internal const string SlowedLine = "vmsnap test hook: reads slowed at ";
    internal const int SlowReadMs = 50;

    private static string s_phase = "";
    private static long s_afterIo;
    private static long s_count;
    private static volatile bool s_reached;

    /// <summary>Installs the hook when a variable is set; does nothing otherwise.</summary>
    public static void Install()
    {
        string? failAt = Environment.GetEnvironmentVariable(FailReadsVariable);
        if (!string.IsNullOrEmpty(failAt))
        {
            LiveTrace.AtMark = phase => s_reached |= phase == failAt;
            LiveTrace.BeforeServedRead = () =>
            {
                if (s_reached) throw new IOException(InjectedReadFailure);
            };
            return;
        }
        string? slowAt = Environment.GetEnvironmentVariable(SlowReadsVariable);
        if (!string.IsNullOrEmpty(slowAt))
        {
            LiveTrace.AtMark = phase =>
            {
                if (phase != slowAt || s_reached) return;
                s_reached = true;
                Console.Error.WriteLine(SlowedLine + phase);
                Console.Error.Flush();
            };
            LiveTrace.BeforeServedRead = () =>
            {
                if (s_reached) Thread.Sleep(SlowReadMs);
            };
            return;
        }
        string? value = Environment.GetEnvironmentVariable(PauseVariable);
        if (string.IsNullOrEmpty(value)) return;
        int plus = value.LastIndexOf('+');
        s_phase = plus < 0 ? value : value[..plus];
        s_afterIo = plus < 0 ? 0 : long.Parse(value[(plus + 1)..], NumberStyles.None, CultureInfo.InvariantCulture);
        LiveTrace.AtMark = AtMark;
    }

    private static void AtMark(string phase)
    {
        if (phase != s_phase) return;
        if (s_afterIo == 0) Pause(phase);
        else FileBlockDevice.BeforeMutatingIo = BeforeIo;
    }

    private static void BeforeIo()
    {
        if (Interlocked.Increment(ref s_count) == s_afterIo) Pause($"{s_phase}+{s_afterIo}");
    }

    private static void Pause(string where)
    {
        Console.Error.WriteLine(PausedLine + where);
        Console.Error.Flush();
        Thread.Sleep(Timeout.Infinite);
    }
}
