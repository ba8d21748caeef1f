namespace Vmsnap.Migration;

/// <summary>
/// A migration stream that cannot be read or written as asked: bad magic or version, an unknown or
/// unsupported section or RAM flag, a missing footer, a stream that ends early, or RAM blocks that do
/// not match the files given. The message names the stream offset and what was expected there.
/// </summary>
public sealed class MigrationStreamException : VmsnapException
{
    /// <summary>Creates the error for a place in the stream (-1 when no single offset applies).</summary>
    public MigrationStreamException(string message, long offset = -1, Exception? inner = null)
        : base(offset >= 0 ? $"migration stream offset {offset}: {message}" : message, inner) => Offset = offset;

    /// <summary>Offset in the stream where the problem was found, or -1 when it is not about one place (e.g. a RAM file's length).</summary>
    public long Offset { get; }
}
