namespace Vmsnap.Live;

/// <summary>
/// A live save or load failed after it began: QEMU's migration failed, stalled or was cancelled, QEMU
/// went away, the guest could not be resumed, or a drive could not be written. What was undone and the
/// state the guest was left in are properties (<see cref="NothingSaved"/>, <see cref="GuestRunning"/>,
/// <see cref="RecoveryPending"/>); the message is composed from them and <see cref="Cause"/>, for printing.
/// <see cref="Exception.InnerException"/> is the first failure, when there is one.
/// </summary>
public sealed class LiveSnapshotException : VmsnapException
{
    /// <summary>Creates the error from a whole message; the properties say nothing is known (false, null).</summary>
    /// <param name="message">What failed, and what was undone.</param>
    /// <param name="inner">The first failure, if any.</param>
    public LiveSnapshotException(string message, Exception? inner = null) : base(message, inner) => Cause = message;

    private LiveSnapshotException(string cause, bool nothingSaved, bool? guestRunning, string? cleanupProblem, string? resumeProblem,
        string? restoreProblem, Exception? inner)
        : base(Compose(cause, nothingSaved, cleanupProblem, resumeProblem, restoreProblem), inner)
    {
        Cause = cause;
        NothingSaved = nothingSaved;
        GuestRunning = guestRunning;
        ResumeProblem = resumeProblem;
        Notes = [.. new[] { cleanupProblem, restoreProblem }.OfType<string>()];
    }

    /// <summary>A failed live save: what failed, whether nothing was saved, the guest's state and what its cleanup could not do.</summary>
    /// <param name="cause">What failed first.</param>
    /// <param name="nothingSaved">No drive keeps the snapshot.</param>
    /// <param name="guestRunning">Whether the guest runs now; null when QEMU cannot be asked.</param>
    /// <param name="cleanupProblem">What could not be given back of what the save wrote, or null.</param>
    /// <param name="resumeProblem">Why the guest could not be put back in the run state it had, or null.</param>
    /// <param name="restoreProblem">What of QEMU's settings or the save's record could not be put back, or null.</param>
    /// <param name="inner">The first failure.</param>
    internal static LiveSnapshotException SaveFailed(string cause, bool nothingSaved, bool? guestRunning, string? cleanupProblem = null,
        string? resumeProblem = null, string? restoreProblem = null, Exception? inner = null) =>
        new(cause, nothingSaved, guestRunning, cleanupProblem, resumeProblem, restoreProblem, inner)
        {
            RecoveryPending = resumeProblem is not null || restoreProblem is not null,
        };

    /// <summary>A recovery that left something undone: a later recovery (<see cref="LiveSnapshots.Recover"/>) goes on from there.</summary>
    internal static LiveSnapshotException RecoveryIncomplete(string cause, bool? guestRunning, Exception? inner = null) =>
        new(cause, nothingSaved: false, guestRunning, null, null, null, inner) { RecoveryPending = true };

    /// <summary>What failed first, without what was undone (the whole message for an error created from a message alone).</summary>
    public string Cause { get; }

    /// <summary>True when no drive keeps the snapshot: a failed save left the images' snapshots as they were.</summary>
    public bool NothingSaved { get; }

    /// <summary>
    /// Whether the guest runs now, as vmsnap left it: true when it ran and was resumed, false when it was paused
    /// before (and stays so), could not be resumed, or QEMU exited; null when not known.
    /// </summary>
    public bool? GuestRunning { get; }

    /// <summary>Why the guest could not be put back in the run state it had before the save, or null when it was.</summary>
    public string? ResumeProblem { get; }

    /// <summary>What the cleanup after the failure could not do (space not given back, settings or the save's record not put back), in order.</summary>
    public IReadOnlyList<string> Notes { get; } = [];

    /// <summary>
    /// True when the save's record stays in QEMU because something could not be undone (the guest resumed, the
    /// migration settings put back): <see cref="LiveSnapshots.Recover"/>, or the next save or load, finishes it
    /// once the problem is fixed.
    /// </summary>
    public bool RecoveryPending { get; private init; }

    private static string Compose(string cause, bool nothingSaved, string? cleanupProblem, string? resumeProblem, string? restoreProblem)
    {
        var parts = new List<string> { cause };
        if (nothingSaved) parts.Add("nothing was saved");
        if (cleanupProblem is not null) parts.Add(cleanupProblem);
        if (resumeProblem is not null) parts.Add($"the guest could not be resumed: {resumeProblem}");
        if (restoreProblem is not null) parts.Add(restoreProblem);
        return string.Join("; ", parts);
    }
}
