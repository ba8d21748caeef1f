using Vmsnap.VmState.LowLevel;

namespace Vmsnap.VmState;

/// <summary>
/// A failure of the VM-state writer or reader (<see cref="VmStateWriter"/>, <see cref="VmStateReader"/>): a write
/// that failed (the backend's error is the inner exception), a stream that ended early, a channel asked
/// to go back. The message gives the stream offset.
/// </summary>
public sealed class VmStateException : VmsnapException
{
    /// <summary>Creates the error.</summary>
    public VmStateException(string message, Exception? inner = null) : base(message, inner) { }
}
