using Vmsnap.VmState;
using Vmsnap.VmState.LowLevel;

namespace Vmsnap.Migration;

/// <summary>
/// QEMU's migration stream, version 3 — the bytes of a savevm snapshot's VM state and of
/// <c>migrate "exec:cat &gt; FILE"</c>: write one for a machine profile, read one into RAM files,
/// inspect one, or copy one verbatim while checking it.
/// </summary>
/// <remarks>
/// Supported: header, configuration (machine type, capabilities), the RAM section version 4 (MEM_SIZE
/// block list, PAGE, ZERO, CONTINUE, EOS; 4 KiB pages) with section footers, early-setup device sections
/// before RAM's parts (QEMU 8.0+, virtio-mem) and the SWITCHOVER_START command (QEMU 10.0+), both carried
/// verbatim, then device sections, EOF and the VM description (either shape: QEMU 8.2+ opens it with a
/// configuration object). Mapped-ram files (capability <c>mapped-ram</c>, QEMU 9.0+ <c>migrate file:</c>
/// with or without multifd, QEMU 10.2 savevm) are read from positional backends and can be rewritten as
/// plain streams, and any stream can be written as a mapped-ram file. Refused with a
/// <see cref="MigrationStreamException"/>: XBZRLE, compressed and RDMA RAM records, the main channel of a
/// multifd migration (MULTIFD_FLUSH; its pages are on other channels), capability x-ignore-shared and
/// unknown capabilities (by name), postcopy/COLO/return-path commands, other iterative sections, and
/// streams of old machine types that write no section footers. A reader's stream runs to the end of its backend.
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
        return ReadStream(source, null, sink, ramBytesDone, cancellationToken);
    }

    /// <summary>Reads a whole stream and says what it holds, skipping page data.</summary>
    /// <exception cref="MigrationStreamException">The stream is malformed, truncated or uses something vmsnap does not read.</exception>
    public static MigrationStreamInfo Inspect(VmStateReader source, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(source);
        return InspectStream(source, null, cancellationToken);
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
        IProgress<long>? ramBytesDone = null, CancellationToken cancellationToken = default) =>
        Copy(source, destination, MigrationStreamFormat.Plain, ramBytesDone, cancellationToken);

    /// <summary>
    /// Copies a stream into <paramref name="format"/>'s RAM layout while parsing it: <see cref="MigrationStreamFormat.Plain"/>
    /// copies a plain stream byte for byte and rewrites a mapped-ram one as the plain stream QEMU's savevm would have
    /// written (same records otherwise, the capability gone from the configuration and the VM description);
    /// <see cref="MigrationStreamFormat.MappedRam"/> writes a mapped-ram file for QEMU 9.0+'s <c>migrate-incoming file:</c>
    /// (the destination must be positional: a file). Flushes the writer but does not close it.
    /// </summary>
    /// <exception cref="MigrationStreamException">The stream is malformed, truncated or uses something vmsnap does not read, or a mapped-ram copy goes to a channel.</exception>
    /// <exception cref="VmStateException">The destination failed.</exception>
    public static MigrationStreamInfo Copy(VmStateReader source, VmStateWriter destination, MigrationStreamFormat format,
        IProgress<long>? ramBytesDone = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(source);
        ArgumentNullException.ThrowIfNull(destination);
        return CopyStream(source, null, destination, format, [], ramBytesDone, cancellationToken);
    }

    /// <summary>
    /// As <see cref="Read"/>, <see cref="Inspect"/> and <see cref="Copy(VmStateReader, VmStateWriter, MigrationStreamFormat, IProgress{long}?, CancellationToken)"/>
    /// for a stream whose backend may reach past it (a snapshot's VM-state area): <paramref name="length"/> is what the
    /// stream's writer counted (the snapshot's VM-state size), which for a mapped-ram stream is less than its extent.
    /// </summary>
    public static MigrationStreamInfo Parse(VmStateReader source, long length, IRamSink? sink = null, VmStateWriter? destination = null,
        MigrationStreamFormat format = MigrationStreamFormat.Plain, IProgress<long>? ramBytesDone = null, CancellationToken cancellationToken = default) =>
        destination is not null ? CopyStream(source, length, destination, format, [], ramBytesDone, cancellationToken)
        : sink is not null ? ReadStream(source, length, sink, ramBytesDone, cancellationToken)
        : InspectStream(source, length, cancellationToken);

    /// <summary>
    /// Copies a stream that a running QEMU migrates out into the plain layout, as QEMU's savevm stores it in a
    /// snapshot (a live save): with <paramref name="markRunning"/> the global run state "paused" is written as the
    /// "running" savevm writes for a guest that runs on, and <paramref name="guestClockNanoseconds"/> gets the guest's
    /// virtual clock at the stop, read from the "timer" device section (null when the stream has no usable one).
    /// Flushes the writer but does not close it.
    /// </summary>
    /// <exception cref="MigrationStreamException">The stream is malformed, truncated or uses something vmsnap does not read.</exception>
    /// <exception cref="VmStateException">The destination failed.</exception>
    public static MigrationStreamInfo CopyAsSaved(VmStateReader source, VmStateWriter destination, bool markRunning, out long? guestClockNanoseconds,
        IProgress<long>? ramBytesDone = null, CancellationToken cancellationToken = default) =>
        CopyAsSaved(source, destination, markRunning, null, out guestClockNanoseconds, ramBytesDone, cancellationToken);

    /// <summary>As the public <c>CopyAsSaved</c>, filling <paramref name="index"/> with where the copy's pages and landmarks lie (the last record of a page wins).</summary>
    internal static MigrationStreamInfo CopyAsSaved(VmStateReader source, VmStateWriter destination, bool markRunning, MigrationStreamIndex? index,
        out long? guestClockNanoseconds, IProgress<long>? ramBytesDone = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(source);
        ArgumentNullException.ThrowIfNull(destination);
        var clock = new GuestClock();
        MigrationStreamInfo info = CopyStream(source, null, destination, MigrationStreamFormat.Plain,
            markRunning ? [GlobalState.MarkRunning, clock] : [clock], ramBytesDone, cancellationToken, index);
        guestClockNanoseconds = clock.Nanoseconds;
        return info;
    }

    /// <summary>As <see cref="Copy(VmStateReader, VmStateWriter, IProgress{long}?, CancellationToken)"/>, filling <paramref name="index"/> with where the copy's pages and landmarks lie.</summary>
    internal static MigrationStreamInfo CopyIndexed(VmStateReader source, VmStateWriter destination, MigrationStreamIndex? index,
        IProgress<long>? ramBytesDone, CancellationToken cancellationToken) =>
        CopyStream(source, null, destination, MigrationStreamFormat.Plain, [], ramBytesDone, cancellationToken, index);

    /// <summary>As the public <c>Write</c>, filling <paramref name="index"/> with where the stream's pages and landmarks lie.</summary>
    internal static MigrationStreamInfo WriteIndexed(VmStateWriter destination, MachineProfile profile, MigrationStreamIndex? index,
        IProgress<long>? ramBytesDone, CancellationToken cancellationToken) =>
        new MigrationStreamWriter(destination, ramBytesDone, cancellationToken).Write(profile, index);

    /// <summary>Reads the stream (to <paramref name="length"/>, or to the backend's end) into <paramref name="sink"/>, then completes it.</summary>
    internal static MigrationStreamInfo ReadStream(VmStateReader source, long? length, IRamSink sink, IProgress<long>? ramBytesDone, CancellationToken cancellationToken)
    {
        var summary = new MigrationStreamSummary();
        foreach (MigrationRecord record in Records(new MigrationRecordReader(source, length), summary, ramBytesDone, cancellationToken))
            RamSinkRecords.Write(sink, record);
        sink.Complete();
        return summary.ToInfo();
    }

    internal static MigrationStreamInfo InspectStream(VmStateReader source, long? length, CancellationToken cancellationToken)
    {
        var summary = new MigrationStreamSummary();
        foreach (MigrationRecord _ in Records(new MigrationRecordReader(source, length, pageData: false), summary, null, cancellationToken)) { }
        return summary.ToInfo();
    }

    /// <summary>
    /// Copies the stream into <paramref name="format"/>'s layout, each record through <paramref name="transforms"/> on its way
    /// (a live save's run state and guest clock). Flushes the writer but does not close it.
    /// </summary>
    internal static MigrationStreamInfo CopyStream(VmStateReader source, long? length, VmStateWriter destination, MigrationStreamFormat format,
        IReadOnlyList<IRecordTransform> transforms, IProgress<long>? ramBytesDone, CancellationToken cancellationToken, MigrationStreamIndex? index = null)
    {
        var output = new MigrationRecordWriter(destination, format, index: index);
        var summary = new MigrationStreamSummary();
        var reader = new MigrationRecordReader(source, length, runBytes: MigrationRecordReader.CopyRunBytes);
        foreach (MigrationRecord record in Records(reader, summary, ramBytesDone, cancellationToken))
        {
            output.ThrowIfFailed();
            MigrationRecord copied = record;
            foreach (IRecordTransform transform in transforms) copied = transform.Apply(copied);
            output.Write(copied);
        }
        output.Finish();
        destination.Flush();
        output.ThrowIfFailed();
        return summary.ToInfo();
    }

    /// <summary>
    /// The records of a whole stream, each counted into <paramref name="summary"/> and the RAM progress, stopping between
    /// records when cancelled.
    /// </summary>
    internal static IEnumerable<MigrationRecord> Records(MigrationRecordReader reader, MigrationStreamSummary summary,
        IProgress<long>? ramBytesDone, CancellationToken cancellationToken)
    {
        var progress = new RamProgress(ramBytesDone);
        while (reader.Next() is { } record)
        {
            cancellationToken.ThrowIfCancellationRequested();
            summary.Add(record);
            progress.Add(record);
            yield return record;
        }
        progress.Done();
    }
}
