namespace Vmsnap.Storage;

/// <summary>The image is in use by another process (a running QEMU, say) in a way that conflicts with what was asked.</summary>
public sealed class ImageInUseException : VmsnapException
{
    /// <summary>Creates the error.</summary>
    /// <param name="message">Which file, and what the other holder keeps from us.</param>
    /// <param name="inner">The failure that led to it, if any.</param>
    public ImageInUseException(string message, Exception? inner = null) : base(message, inner) { }
}
