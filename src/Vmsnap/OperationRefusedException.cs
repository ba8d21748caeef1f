namespace Vmsnap;

/// <summary>
/// vmsnap refused what was asked because the image, the snapshot or the VM is not in a state that
/// allows it: the image is read-only or has a VM-state area open, a snapshot has no VM state or was
/// taken of a disk of another size, a name is missing, the guest is in the wrong run state, a drive
/// changed while it was saved. The message says what and, where it applies, that nothing was changed.
/// </summary>
public sealed class OperationRefusedException : VmsnapException
{
    /// <summary>Creates the error.</summary>
    /// <param name="message">What was refused and why.</param>
    /// <param name="inner">The failure that led to the refusal, if any.</param>
    public OperationRefusedException(string message, Exception? inner = null) : base(message, inner) { }
}
