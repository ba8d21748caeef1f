using System.Diagnostics;

namespace Vmsnap.Live;

/// <summary>
/// Timestamps of a live save's or load's phases on standard error, when VMSNAP_LIVE_TRACE=1: where the
/// time of a save (and of the guest's stop) goes. Wall-clock UTC beside each mark, to set them against
/// the timestamps of QEMU's STOP and RESUME events.
/// </summary>
internal static class LiveTrace
{
    private static readonly bool s_on = Environment.GetEnvironmentVariable("VMSNAP_LIVE_TRACE") == "1";
    private static readonly Stopwatch s_clock = Stopwatch.StartNew();
    // Marks count from the process's start, so that what precedes the first mark (runtime start-up, QMP's greeting) shows too.
    private static readonly double s_startedMs = s_on ? (DateTime.Now - Process.GetCurrentProcess().StartTime).TotalMilliseconds : 0;

    internal static bool On => s_on;

    /// <summary>
    /// Called with every phase's name, traced or not: the seam for tests that stop a real vmsnap at a phase (a startup hook
    /// sets it) and kill it there.
    /// </summary>
    internal static Action<string>? AtMark;

    /// <summary>
    /// Called before each read of the snapshot a postcopy load serves pages from: the seam for tests that make the image's
    /// reads fail in the middle of serving (a startup hook sets it to throw an <see cref="IOException"/>).
    /// </summary>
    internal static Action? BeforeServedRead;

    internal static void Mark(string what)
    {
        AtMark?.Invoke(what);
        if (!s_on) return;
        Console.Error.WriteLine($"vmsnap trace {s_startedMs + s_clock.Elapsed.TotalMilliseconds,10:0.0} ms {DateTimeOffset.UtcNow:HH:mm:ss.fff} {what}");
    }
}
