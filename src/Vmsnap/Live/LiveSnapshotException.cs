namespace Vmsnap.Live;

/// <summary>
/// A live save or load failed after it began: QEMU's migration failed, stalled or was cancelled, QEMU
/// went away, the guest could not be resumed, or a drive could not be written. The message says what
/// was undone ("nothing was saved", "the drives were reverted to the snapshot") and the state the
/// guest was left in; <see cref="Exception.InnerException"/> is the first failure, when there is one.
/// </summary>
public sealed class LiveSnapshotException : VmsnapException
{
    /// <summary>Creates the error.</summary>
    /// <param name="message">What failed, and what was undone.</param>
    /// <param name="inner">The first failure, if any.</param>
    public LiveSnapshotException(string message, Exception? inner = null) : base(message, inner) { }
}
