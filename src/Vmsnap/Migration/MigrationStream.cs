using Vmsnap.VmState;

namespace Vmsnap.Migration;

/// <summary>
/// QEMU's migration stream, version 3 — the bytes of a savevm snapshot's VM state and of
/// <c>migrate "exec:cat &gt; FILE"</c>: write one for a machine profile, read one into RAM files,
/// inspect one, or copy one verbatim while checking it.
/// </summary>
/// <remarks>
/// Supported: header, configuration (machine type), the RAM section version 4 (MEM_SIZE block list,
/// PAGE, ZERO, CONTINUE, EOS; 4 KiB pages) with section footers, then device sections, EOF and the VM
/// description, which are carried verbatim. Refused with a <see cref="MigrationStreamException"/>:
/// XBZRLE, compressed, multifd and RDMA RAM records, streams written with migration capabilities that
/// change the RAM layout (x-ignore-shared, mapped-ram), postcopy/return-path command sections, other
/// iterative sections, and streams of old machine types that write no section footers.
/// A reader's stream runs to the end of its backend.
/// </remarks>
public static class MigrationStream
{
    /// <summary>
    /// Writes a whole stream for <paramref name="profile"/> into <paramref name="destination"/>: header,
    /// configuration, the RAM section (every page of every block, zero pages as ZERO records, in parts of
    /// 64 MiB of RAM), then the profile's device state. Flushes the writer but does not close it.
    /// </summary>
    /// <param name="destination">Where the stream goes; the caller closes it (and sees its errors there too).</param>
    /// <param name="profile">Machine type, RAM blocks and their files, device state.</param>
    /// <param name="ramBytesDone">Receives the bytes of RAM encoded so far (of the profile's total).</param>
    /// <param name="cancellationToken">Stops between chunks of RAM.</param>
    /// <returns>What was written: sections, blocks with page and zero-page counts, devices, size.</returns>
    /// <exception cref="MigrationStreamException">A RAM file changed length since the profile was made.</exception>
    /// <exception cref="VmStateException">The writer failed (its first error is the inner exception).</exception>
    public static MigrationStreamInfo Write(VmStateWriter destination, MachineProfile profile,
        IProgress<long>? ramBytesDone = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(destination);
        ArgumentNullException.ThrowIfNull(profile);
        return new MigrationStreamWriter(destination, ramBytesDone, cancellationToken).Write(profile);
    }

    /// <summary>As <see cref="Write"/> with chosen part and chunk sizes (tests, benchmarks).</summary>
    internal static MigrationStreamInfo WriteInParts(VmStateWriter destination, MachineProfile profile, long partBytes, int chunkBytes,
        IProgress<long>? ramBytesDone = null, CancellationToken cancellationToken = default) =>
        new MigrationStreamWriter(destination, ramBytesDone, cancellationToken, partBytes, chunkBytes).Write(profile);

    /// <summary>
    /// Reads a whole stream from <paramref name="source"/>, handing its block list and pages to
    /// <paramref name="sink"/>, and completes the sink once the stream, device state included, was read
    /// without error.
    /// </summary>
    /// <param name="source">The stream, read to the end of its backend.</param>
    /// <param name="sink">Receives the RAM, e.g. a <see cref="RamFileSink"/>.</param>
    /// <param name="ramBytesDone">Receives the bytes of RAM records (pages and zero pages) read so far; an <see cref="IRamProgress"/> also gets the stream's total RAM once its block list is read.</param>
    /// <param name="cancellationToken">Stops between records.</param>
    /// <exception cref="MigrationStreamException">The stream is malformed, truncated or uses something vmsnap does not read; the message gives the offset.</exception>
    public static MigrationStreamInfo Read(VmStateReader source, IRamSink sink,
        IProgress<long>? ramBytesDone = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(source);
        ArgumentNullException.ThrowIfNull(sink);
        return new MigrationStreamReader(source, sink, null, ramBytesDone, cancellationToken).Read();
    }

    /// <summary>Reads a whole stream and says what it holds, skipping page data.</summary>
    /// <exception cref="MigrationStreamException">The stream is malformed, truncated or uses something vmsnap does not read.</exception>
    public static MigrationStreamInfo Inspect(VmStateReader source, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(source);
        return new MigrationStreamReader(source, null, null, null, cancellationToken).Read();
    }

    /// <summary>
    /// Copies a stream byte for byte from <paramref name="source"/> to <paramref name="destination"/>
    /// while parsing it, so a stream that is corrupt, truncated or not one vmsnap reads is refused with
    /// its offset (import into and export out of a snapshot). Flushes the writer but does not close it;
    /// on failure the destination holds a partial copy the caller must discard.
    /// </summary>
    /// <param name="source">The stream, read to the end of its backend.</param>
    /// <param name="destination">Receives every byte unchanged.</param>
    /// <param name="ramBytesDone">Receives the bytes of RAM records copied so far; an <see cref="IRamProgress"/> also gets the stream's total RAM once its block list is read.</param>
    /// <param name="cancellationToken">Stops between records.</param>
    /// <exception cref="MigrationStreamException">The stream is malformed, truncated or uses something vmsnap does not read.</exception>
    /// <exception cref="VmStateException">The destination failed.</exception>
    public static MigrationStreamInfo Copy(VmStateReader source, VmStateWriter destination,
        IProgress<long>? ramBytesDone = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(source);
        ArgumentNullException.ThrowIfNull(destination);
        return new MigrationStreamReader(source, null, destination, ramBytesDone, cancellationToken).Read();
    }
}
