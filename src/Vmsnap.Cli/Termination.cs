using System.Runtime.InteropServices;

namespace Vmsnap.Cli;

/// <summary>
/// SIGINT (Ctrl-C) and SIGTERM while a command runs: the first one cancels the command, which undoes
/// what it had written and ends with 128 + the signal's number (130, 143), as shells expect of a
/// program a signal stopped. If the clean-up takes longer than the grace period the process ends
/// anyway with that code (a cut clean-up is crash-safe, but may leak clusters). Later signals are
/// ignored meanwhile.
/// </summary>
internal sealed class Termination : IDisposable
{
    private const int SigInt = 2, SigTerm = 15;

    private readonly CancellationTokenSource _cancel = new();
    private readonly TimeSpan _grace;
    private readonly PosixSignalRegistration[] _registrations;
    private int _signal;
    private int _signals;
    private Timer? _deadline;
    private volatile string? _holding;

    private Termination(TimeSpan grace)
    {
        _grace = grace;
        _registrations =
        [
            PosixSignalRegistration.Create(PosixSignal.SIGINT, OnSignal),
            PosixSignalRegistration.Create(PosixSignal.SIGTERM, OnSignal),
        ];
    }

    /// <summary>The handler of the running command (one per process), or null before one is installed.</summary>
    internal static Termination? Current { get; private set; }

    /// <summary>Installs the handler for the command about to run.</summary>
    internal static Termination Install(TimeSpan grace) => Current = new Termination(grace);

    /// <summary>Cancelled by the first SIGINT or SIGTERM.</summary>
    internal CancellationToken Token => _cancel.Token;

    /// <summary>The signal received (2 or 15), or 0.</summary>
    internal int Signal => Volatile.Read(ref _signal);

    /// <summary>128 + the signal's number, the exit code of a command the signal stopped; null without a signal.</summary>
    internal int? SignalExitCode => Signal == 0 ? null : 128 + Signal;

    /// <summary>The signal's name for messages ("SIGINT").</summary>
    internal string SignalName => Signal switch { SigInt => "SIGINT", SigTerm => "SIGTERM", _ => "a signal" };

    /// <summary>
    /// From now until <see cref="Release"/>, a signal does not stop the command: the first one is noted and answered with
    /// <paramref name="why"/> (what the command finishes first), later ones with <paramref name="cost"/> (what stopping
    /// now would do).
    /// </summary>
    internal void Hold(string why, string cost)
    {
        _holding = why + "\n" + cost;
    }

    /// <summary>Ends <see cref="Hold"/>: a signal received meanwhile is reported by the command, which ends normally.</summary>
    internal void Release() => _holding = null;

    private void OnSignal(PosixSignalContext context)
    {
        context.Cancel = true;   // no default termination: the command cleans up first
        int signal = context.Signal == PosixSignal.SIGINT ? SigInt : SigTerm;
        if (_holding is string holding)
        {
            Interlocked.CompareExchange(ref _signal, signal, 0);
            string[] parts = holding.Split('\n', 2);
            Console.Error.WriteLine(Interlocked.Increment(ref _signals) == 1
                ? $"vmsnap: {(signal == SigInt ? "SIGINT" : "SIGTERM")}: {parts[0]}"
                : $"vmsnap: {parts[1]}");
            return;
        }
        if (Interlocked.CompareExchange(ref _signal, signal, 0) != 0) return;
        _deadline = new Timer(_ => Environment.Exit(128 + signal), null, _grace, Timeout.InfiniteTimeSpan);
        _cancel.Cancel();
    }

    public void Dispose()
    {
        foreach (PosixSignalRegistration r in _registrations) r.Dispose();
        _deadline?.Dispose();
        if (Current == this) Current = null;
    }
}
