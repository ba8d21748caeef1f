namespace Vmsnap;

/// <summary>
/// Base type of every error vmsnap reports about its input or its I/O: the message says what is
/// wrong and where (file offset, table, snapshot), so a caller can print it as it is.
/// </summary>
public class VmsnapException : Exception
{
    /// <summary>Creates the error with a message that names the problem.</summary>
    public VmsnapException(string message) : base(message) { }

    /// <summary>Creates the error with a message and the failure that caused it.</summary>
    public VmsnapException(string message, Exception? inner) : base(message, inner) { }
}
