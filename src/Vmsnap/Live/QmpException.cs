namespace Vmsnap.Live;

/// <summary>QEMU refused a QMP command, or the QMP connection failed; the message has QEMU's own words.</summary>
public sealed class QmpException : VmsnapException
{
    /// <summary>Creates the error.</summary>
    public QmpException(string message, string? errorClass = null, Exception? inner = null) : base(message, inner) => ErrorClass = errorClass;

    /// <summary>QEMU's error class (<c>GenericError</c>, <c>CommandNotFound</c>, ...), or null when the connection failed.</summary>
    public string? ErrorClass { get; }
}
