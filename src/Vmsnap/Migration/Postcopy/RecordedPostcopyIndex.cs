using System.Buffers.Binary;
using System.Runtime.CompilerServices;
using System.IO.Hashing;
using System.Text;
using Vmsnap.VmState;
using Vmsnap.VmState.LowLevel;

namespace Vmsnap.Migration.LowLevel;

/// <summary>
/// The postcopy index a save records beside its stream, so <c>loadvm --postcopy</c> finds the device state and every
/// page without reading the whole VM state first (docs/postcopy-index.md has the byte layout).
/// </summary>
/// <remarks>
/// <para>Where it lives: the index (a blob) goes into the snapshot's VM-state area past the stream, at the first cluster
/// boundary after it; the snapshot's L1 maps those clusters like the stream's, so refcounts and <c>qemu-img check</c> stay
/// clean, and QEMU and older vmsnap, which read <c>vm_state_size</c> bytes, never see it. A pointer of
/// <see cref="PointerBytes"/> bytes in the snapshot table entry's extra data, after QEMU's known fields, says where the blob
/// is, how long, the stream length it describes and the blob's checksum. QEMU (5.0 and later) keeps unknown extra data
/// (up to 1 KiB per entry) when it rewrites the table; when something drops it, the index is simply missed.</para>
/// <para>Nothing is trusted unchecked: the pointer's stream length must be the snapshot's VM-state size; the blob's hash,
/// its own copy of the stream length and its landmarks must agree; the stream's bytes before the RAM pages and its device
/// state (what postcopy sends first) must hash as recorded; the page header before sampled data pages must name that page.
/// Any mismatch is a "problem" and the caller scans the stream instead.</para>
/// <para>The pages as runs per block, in page order: pages whose data lie at a constant stride (vmsnap's and QEMU's
/// streams put consecutive pages one record apart), pages filled with one byte (ZERO records), and gaps (pages the stream
/// lacks). Built from the final positions (a <see cref="MigrationStreamIndex"/> filled while the stream was written), so
/// a page QEMU re-sent during a live save is found at its last record.</para>
/// </remarks>
public static class RecordedPostcopyIndex
{
    /// <summary>Bytes of the pointer in the snapshot table entry's extra data.</summary>
    internal const int PointerBytes = 64;

    // Version 2: XxHash128 checksums (managed: the native executable needs no OpenSSL); version 1 had SHA-256.
    private const uint Version = 2;
    private const int HashBytes = 16;
    private const long MaxBlobBytes = 1L << 30;
    private const int SampledRuns = 64;
    private static ReadOnlySpan<byte> PointerMagic => "vmsnapPX"u8;
    private static ReadOnlySpan<byte> BlobMagic => "vmsnapPI"u8;

    private const byte RunFilled = 1;
    private const byte RunData = 2;

    /// <summary>Reads <paramref name="into"/>.Length bytes of the VM-state area at <paramref name="offset"/>; returns the bytes read.</summary>
    public delegate int ReadAt(Span<byte> into, long offset);

    /// <summary>Writes <paramref name="bytes"/> to the VM-state area at <paramref name="offset"/>.</summary>
    public delegate void WriteAt(ReadOnlySpan<byte> bytes, long offset);

    /// <summary>
    /// Records the index of a stream just written (<paramref name="streamLength"/> bytes from offset 0 of the area): the blob
    /// goes past the stream, at the first multiple of <paramref name="clusterSize"/>. Returns the pointer for the snapshot's
    /// extra data and the area's end (blob included); null when the stream is not one postcopy serves (nothing is written).
    /// </summary>
    /// <param name="recorder">What the stream's writer recorded.</param>
    /// <param name="streamLength">Bytes of the stream (the snapshot's VM-state size to be).</param>
    /// <param name="clusterSize">The image's cluster size.</param>
    /// <param name="read">Reads the area (the stream's head and device state are hashed into the index).</param>
    /// <param name="write">Writes the area.</param>
    public static (byte[] Pointer, long AreaEnd)? Record(PostcopyIndexRecorder recorder, long streamLength, int clusterSize, ReadAt read, WriteAt write)
    {
        ArgumentNullException.ThrowIfNull(recorder);
        return RecordIndex(recorder.Index, streamLength, clusterSize, read, write);
    }

    internal static (byte[] Pointer, long AreaEnd)? RecordIndex(MigrationStreamIndex index, long streamLength, int clusterSize, ReadAt read, WriteAt write)
    {
        if (index.StreamEnd != streamLength || PostcopySource.Problem(index) is not null) return null;
        byte[] head = ReadRange(read, 0, index.RamStartEnd, "the stream's head");
        byte[] device = ReadRange(read, index.DeviceStateOffset, streamLength - index.DeviceStateOffset, "the device state");
        byte[] blob = EncodeBlob(index, streamLength, head, device);
        long blobOffset = (streamLength + clusterSize - 1) / clusterSize * clusterSize;
        write(blob, blobOffset);
        return (Pointer(blobOffset, blob, streamLength), blobOffset + blob.Length);
    }

    /// <summary>True when <paramref name="extraData"/> (a snapshot's extra data past QEMU's fields) starts with a vmsnap postcopy-index pointer.</summary>
    public static bool HasPointer(ReadOnlySpan<byte> extraData) => extraData.Length >= PointerBytes && extraData.StartsWith(PointerMagic);

    /// <summary>
    /// The recorded index of a snapshot's stream (<paramref name="streamLength"/> bytes, its VM-state size), read through
    /// <paramref name="read"/> (the whole VM-state area), or null with <paramref name="problem"/> saying why it cannot be used
    /// (null problem: there is no record).
    /// </summary>
    public static PostcopyIndex? Load(ReadOnlySpan<byte> extraData, long streamLength, ReadAt read, out string? problem)
    {
        problem = null;
        if (!HasPointer(extraData)) return null;
        try
        {
            return LoadChecked(extraData, streamLength, read, out problem);
        }
        catch (Exception e) when (e is MigrationStreamException or IOException or VmsnapException or ArgumentException or OverflowException)
        {
            problem = $"the recorded index does not read: {e.Message}";
            return null;
        }
    }

    private static PostcopyIndex? LoadChecked(ReadOnlySpan<byte> extraData, long streamLength, ReadAt read, out string? problem)
    {
        problem = null;
        ReadOnlySpan<byte> p = extraData[..PointerBytes];
        uint version = BinaryPrimitives.ReadUInt32BigEndian(p[8..]);
        long blobLength = BinaryPrimitives.ReadUInt32BigEndian(p[12..]);
        long blobOffset = (long)BinaryPrimitives.ReadUInt64BigEndian(p[16..]);
        long recordedLength = (long)BinaryPrimitives.ReadUInt64BigEndian(p[24..]);
        if (version != Version) return Fail(out problem, $"the recorded index has version {version} (this vmsnap reads {Version})");
        if (recordedLength != streamLength)
            return Fail(out problem, $"the recorded index describes a stream of {recordedLength} bytes, the snapshot's is {streamLength}");
        if (blobOffset < streamLength || blobLength < 8 + HashBytes || blobLength > MaxBlobBytes || blobOffset > long.MaxValue - blobLength)
            return Fail(out problem, $"the recorded index's place ({blobLength} bytes at {blobOffset}) is not past the stream");
        byte[] blob = ReadRange(read, blobOffset, blobLength, "the recorded index");
        if (!Checksum(blob).AsSpan().SequenceEqual(p.Slice(32, HashBytes)))
            return Fail(out problem, "the recorded index's bytes do not match their checksum");

        var b = new BlobReader(blob);
        if (!b.Bytes(8).SequenceEqual(BlobMagic) || b.U32() != Version) return Fail(out problem, "the recorded index has no valid header");
        b.U32();   // flags, none yet
        if (b.I64() != streamLength) return Fail(out problem, "the recorded index's stream length differs from its pointer's");
        long ramStartEnd = b.I64(), deviceStateOffset = b.I64(), eofOffset = b.I64();
        byte[] headHash = b.Bytes(HashBytes).ToArray(), deviceHash = b.Bytes(HashBytes).ToArray();
        if (ramStartEnd <= 0 || ramStartEnd > deviceStateOffset || deviceStateOffset > eofOffset || eofOffset >= streamLength)
            return Fail(out problem, "the recorded index's landmarks are out of order");

        // What postcopy sends first must be exactly what was recorded.
        byte[] head = ReadRange(read, 0, ramStartEnd, "the stream's head");
        if (!Checksum(head).AsSpan().SequenceEqual(headHash)) return Fail(out problem, "the stream's head differs from the one the index was recorded for");
        byte[] device = ReadRange(read, deviceStateOffset, streamLength - deviceStateOffset, "the device state");
        if (!Checksum(device).AsSpan().SequenceEqual(deviceHash)) return Fail(out problem, "the device state differs from the one the index was recorded for");
        (ConfigurationRecord configuration, RamStartRecord start) = ParseHead(head, streamLength);

        int early = checked((int)b.U32());
        var earlySections = new List<(long, long)>();
        for (int i = 0; i < early; i++)
        {
            long offset = b.I64(), length = b.I64();
            if (offset < configuration.Offset + configuration.Length || length <= 0 || offset > deviceStateOffset - length)
                return Fail(out problem, "the recorded index's early-setup sections lie outside the stream's head");
            earlySections.Add((offset, length));
        }
        int blocks = checked((int)b.U32());
        if (blocks != start.Blocks.Count) return Fail(out problem, $"the recorded index has {blocks} RAM blocks, the stream {start.Blocks.Count}");
        var index = MigrationStreamIndex.FromLandmarks(configuration.Offset + configuration.Length, start, earlySections, deviceStateOffset, eofOffset, streamLength);
        if (PostcopySource.Problem(index) is { } unusable) return Fail(out problem, unusable);

        // Every page of every run is set; the runs' pages are bounded by what the stream can hold (a ZERO record takes 9 bytes or more).
        long budget = streamLength / 9 + 1;
        var summaries = new RamBlockSummary[blocks];
        var samples = new List<(int Block, long Page, long Offset)>();
        long dataRuns = 0;
        for (int block = 0; block < blocks; block++)
        {
            long blockPages = start.Blocks[block].Length / MigrationFormat.PageSize;
            long runs = b.Varint(), next = 0, lastOffset = 0, dataPages = 0, filledPages = 0;
            if (runs < 0 || runs > blob.Length) return Fail(out problem, $"the recorded index has {runs} runs for RAM block '{start.Blocks[block].Id}'");
            var blockRuns = new PageRun[runs];
            for (long r = 0; r < runs; r++)
            {
                long first = checked(next + b.Varint()), count = b.Varint();
                byte kind = b.U8();
                if (count <= 0 || first < next || first > blockPages - count || (budget -= count) < 0)
                    return Fail(out problem, $"the recorded index's run of {count} pages at page {first} of RAM block '{start.Blocks[block].Id}' is outside it");
                if (kind == RunFilled)
                {
                    blockRuns[r] = new PageRun(first, count, -1, 0, b.U8());
                    filledPages += count;
                }
                else if (kind == RunData)
                {
                    long offset = checked(lastOffset + b.Zigzag()), stride = b.Zigzag();
                    long last = checked(offset + (count - 1) * stride);
                    if (Math.Min(offset, last) < ramStartEnd || Math.Max(offset, last) > deviceStateOffset - MigrationFormat.PageSize)
                        return Fail(out problem, $"the recorded index puts page {first} of RAM block '{start.Blocks[block].Id}' outside the stream's RAM");
                    blockRuns[r] = new PageRun(first, count, offset, stride, -1);
                    // The first and last page of some runs, spread over the stream: a cheap check that the runs fit the stream.
                    if (samples.Count < 2 * SampledRuns)
                    {
                        samples.Add((block, first, offset));
                        samples.Add((block, first + count - 1, last));
                    }
                    else if (dataRuns % 7 == 0)
                    {
                        int slot = (int)(dataRuns / 7 % SampledRuns) * 2;
                        samples[slot] = (block, first, offset);
                        samples[slot + 1] = (block, first + count - 1, last);
                    }
                    dataRuns++;
                    lastOffset = last;
                    dataPages += count;
                }
                else
                {
                    return Fail(out problem, $"the recorded index has a run of unknown kind {kind}");
                }
                next = first + count;
            }
            index.SetRuns(block, blockRuns);
            summaries[block] = new RamBlockSummary(start.Blocks[block].Id, start.Blocks[block].Length, dataPages, filledPages);
        }
        if (!b.AtHashEnd) return Fail(out problem, "the recorded index has bytes after its runs");
        // A one-page run's first and last page are the same sample: each place is read once.
        foreach ((int block, long page, long offset) in samples.Distinct())
        {
            if (!NamesPage(read, start.BlockIds[block], page, offset))
                return Fail(out problem, $"the stream has no record of page {page} of RAM block '{start.Blocks[block].Id}' where the recorded index puts it (offset {offset})");
        }
        var info = new MigrationStreamInfo(configuration.MachineType, [], summaries, [], streamLength, streamLength - deviceStateOffset, null,
            configuration.Capabilities);
        return new PostcopyIndex(index, info);
    }

    private static PostcopyIndex? Fail(out string? problem, string why)
    {
        problem = why;
        return null;
    }

    /// <summary>The configuration and RAM start records of the stream's head (header, configuration, up to the block list).</summary>
    private static (ConfigurationRecord, RamStartRecord) ParseHead(byte[] head, long streamLength)
    {
        using var backend = VmStateBackend.ForStream(new MemoryStream(head, writable: false));
        using var reader = new VmStateReader(backend, 64 << 10);
        var records = new MigrationRecordReader(reader, streamLength, pageData: false);
        ConfigurationRecord? configuration = null;
        while (records.Next() is { } record)
        {
            if (record is ConfigurationRecord c) configuration = c;
            if (record is RamStartRecord start)
            {
                return configuration is null
                    ? throw new MigrationStreamException("the stream has no configuration section before its RAM", 0)
                    : (configuration, start);
            }
        }
        throw new MigrationStreamException("the stream's head has no RAM section start", 0);
    }

    /// <summary>True when the bytes before <paramref name="dataOffset"/> are the PAGE record header of <paramref name="page"/> (with CONTINUE, or naming its block).</summary>
    private static bool NamesPage(ReadAt read, byte[] blockId, long page, long dataOffset)
    {
        int before = 8 + 1 + blockId.Length;
        long from = Math.Max(0, dataOffset - before);
        Span<byte> bytes = stackalloc byte[before];
        Span<byte> got = bytes[..(int)(dataOffset - from)];
        if (read(got, from) != got.Length) return false;
        ulong address = (ulong)(page * MigrationFormat.PageSize);
        if (got.Length >= 8 && BinaryPrimitives.ReadUInt64BigEndian(got[^8..]) == (address | MigrationFormat.RamPage | MigrationFormat.RamContinue)) return true;
        return got.Length == before
            && BinaryPrimitives.ReadUInt64BigEndian(got) == (address | MigrationFormat.RamPage)
            && got[8] == blockId.Length && got[9..].SequenceEqual(blockId);
    }

    private static byte[] ReadRange(ReadAt read, long offset, long length, string what)
    {
        if (length < 0 || length > MaxBlobBytes) throw new MigrationStreamException($"{what} would be {length} bytes", offset);
        byte[] bytes = new byte[length];
        int n = read(bytes, offset);
        if (n != length) throw new MigrationStreamException($"{what} ({length} bytes at offset {offset}) reads short ({n} bytes)", offset);
        return bytes;
    }

    /// <summary>A 128-bit checksum against damage and staleness (not against tampering).</summary>
    private static byte[] Checksum(ReadOnlySpan<byte> bytes) => XxHash128.Hash(bytes);

    private static byte[] Pointer(long blobOffset, byte[] blob, long streamLength)
    {
        byte[] p = new byte[PointerBytes];
        PointerMagic.CopyTo(p);
        BinaryPrimitives.WriteUInt32BigEndian(p.AsSpan(8), Version);
        BinaryPrimitives.WriteUInt32BigEndian(p.AsSpan(12), (uint)blob.Length);
        BinaryPrimitives.WriteUInt64BigEndian(p.AsSpan(16), (ulong)blobOffset);
        BinaryPrimitives.WriteUInt64BigEndian(p.AsSpan(24), (ulong)streamLength);
        Checksum(blob).CopyTo(p.AsSpan(32));
        return p;
    }

    /// <summary>The blob: header, landmarks and hashes, early-setup sections, each block's runs, and a checksum of all before it.</summary>
    /// <remarks>Compiled optimized at once: it runs once per save, over every page, while a live save's guest is stopped.</remarks>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static byte[] EncodeBlob(MigrationStreamIndex index, long streamLength, ReadOnlySpan<byte> head, ReadOnlySpan<byte> deviceState)
    {
        var w = new BlobWriter();
        w.Bytes(BlobMagic);
        w.U32(Version);
        w.U32(0);
        w.I64(streamLength);
        w.I64(index.RamStartEnd);
        w.I64(index.DeviceStateOffset);
        w.I64(index.EofOffset);
        w.Bytes(Checksum(head));
        w.Bytes(Checksum(deviceState));
        w.U32((uint)index.EarlySections.Count);
        foreach ((long offset, long length) in index.EarlySections)
        {
            w.I64(offset);
            w.I64(length);
        }
        w.U32((uint)index.Blocks.Count);
        var runs = new RunEncoder();
        for (int block = 0; block < index.Blocks.Count; block++)
        {
            runs.Clear();
            long pages = index.Blocks[block].Length / MigrationFormat.PageSize;
            // The raw values table by table (not a lookup per page): this runs while a live save's guest is stopped.
            for (long t = 0; t * MigrationStreamIndex.TablePages < pages; t++)
            {
                long first = t * MigrationStreamIndex.TablePages;
                if (!index.TryGetTable(block, t, out long[] values))
                {
                    runs.Missing();
                    continue;
                }
                for (int i = 0; i < values.Length; i++) runs.Add(first + i, values[i]);
            }
            runs.Flush();
            w.Varint(runs.Count);
            w.Bytes(runs.Bytes);
        }
        w.Bytes(Checksum(w.Span));
        return w.Span.ToArray();
    }

    /// <summary>Builds a block's runs from its pages' raw values in page order (0 missing, &gt; 0 data offset + 1, &lt; 0 filled with -value - 1).</summary>
    private sealed class RunEncoder
    {
        private readonly BlobWriter _out = new();
        private long _first = -1, _count, _value, _stride, _next, _lastOffset;

        public long Count { get; private set; }

        public ReadOnlySpan<byte> Bytes => _out.Span;

        public void Clear()
        {
            _out.Clear();
            _first = -1;
            _next = 0;
            _lastOffset = 0;
            Count = 0;
        }

        public void Missing() => Flush();

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void Add(long page, long value)
        {
            if (value == 0) { Flush(); return; }
            if (_first >= 0 && page == _first + _count)
            {
                if (value < 0 && value == _value) { _count++; return; }
                if (value > 0 && _value > 0)
                {
                    if (_count == 1) { _stride = value - _value; _count++; return; }
                    if (value - 1 == _value - 1 + _count * _stride) { _count++; return; }
                }
            }
            Flush();
            _first = page;
            _count = 1;
            _value = value;
            _stride = 0;
        }

        public void Flush()
        {
            if (_first < 0) return;
            _out.Varint(_first - _next);
            _out.Varint(_count);
            if (_value < 0)
            {
                _out.U8(RunFilled);
                _out.U8((byte)(-_value - 1));
            }
            else
            {
                long offset = _value - 1;
                _out.U8(RunData);
                _out.Zigzag(offset - _lastOffset);
                _out.Zigzag(_stride);
                _lastOffset = offset + (_count - 1) * _stride;
            }
            Count++;
            _next = _first + _count;
            _first = -1;
        }
    }

    private sealed class BlobWriter
    {
        private byte[] _bytes = new byte[4096];
        private int _used;

        public ReadOnlySpan<byte> Span => _bytes.AsSpan(0, _used);

        public void Clear() => _used = 0;

        private Span<byte> Take(int n)
        {
            if (_used + n > _bytes.Length) Array.Resize(ref _bytes, Math.Max(_bytes.Length * 2, _used + n));
            Span<byte> s = _bytes.AsSpan(_used, n);
            _used += n;
            return s;
        }

        public void Bytes(ReadOnlySpan<byte> b) => b.CopyTo(Take(b.Length));
        public void U8(byte v) => Take(1)[0] = v;
        public void U32(uint v) => BinaryPrimitives.WriteUInt32BigEndian(Take(4), v);
        public void I64(long v) => BinaryPrimitives.WriteInt64BigEndian(Take(8), v);

        public void Varint(long v)
        {
            ulong u = (ulong)v;
            while (u >= 0x80)
            {
                U8((byte)(u | 0x80));
                u >>= 7;
            }
            U8((byte)u);
        }

        public void Zigzag(long v) => Varint((v << 1) ^ (v >> 63));
    }

    /// <summary>Reads the blob; any read past its runs (before the closing hash) is a format error.</summary>
    private ref struct BlobReader(byte[] blob)
    {
        private readonly byte[] _blob = blob;
        private int _at;

        public readonly bool AtHashEnd => _at == _blob.Length - HashBytes;

        public ReadOnlySpan<byte> Bytes(int n)
        {
            if (n < 0 || _at > _blob.Length - HashBytes - n) throw new MigrationStreamException("the recorded index is truncated", _at);
            ReadOnlySpan<byte> s = _blob.AsSpan(_at, n);
            _at += n;
            return s;
        }

        public byte U8() => Bytes(1)[0];
        public uint U32() => BinaryPrimitives.ReadUInt32BigEndian(Bytes(4));
        public long I64() => BinaryPrimitives.ReadInt64BigEndian(Bytes(8));

        public long Varint()
        {
            ulong u = 0;
            for (int shift = 0; ; shift += 7)
            {
                if (shift > 63) throw new MigrationStreamException("the recorded index has a number too long", _at);
                byte b = U8();
                u |= (ulong)(b & 0x7f) << shift;
                if (b < 0x80) break;
            }
            return (long)u;
        }

        public long Zigzag()
        {
            long v = Varint();
            return (long)((ulong)v >> 1) ^ -(v & 1);
        }
    }
}

/// <summary>
/// Writes or copies a stream as <see cref="MigrationStream"/> does, noting where each page and landmark of the output lies
/// (the last record of a page wins), so <c>RecordedPostcopyIndex.Record</c> can store the postcopy index beside it.
/// Memory: 8 bytes per page of RAM the stream carries (as a scan's index).
/// </summary>
public sealed class PostcopyIndexRecorder
{
    internal MigrationStreamIndex Index { get; } = new();

    /// <summary>As <see cref="MigrationStream.Write(VmStateWriter, MachineProfile, IProgress{long}?, CancellationToken)"/>, noting the pages.</summary>
    public MigrationStreamInfo Write(VmStateWriter destination, MachineProfile profile, IProgress<long>? ramBytesDone = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(destination);
        ArgumentNullException.ThrowIfNull(profile);
        return MigrationStream.WriteIndexed(destination, profile, Index, ramBytesDone, cancellationToken);
    }

    /// <summary>As <see cref="MigrationStream.Copy(VmStateReader, VmStateWriter, IProgress{long}?, CancellationToken)"/> (a plain copy), noting the pages.</summary>
    public MigrationStreamInfo Copy(VmStateReader source, VmStateWriter destination, IProgress<long>? ramBytesDone = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(source);
        ArgumentNullException.ThrowIfNull(destination);
        return MigrationStream.CopyIndexed(source, destination, Index, ramBytesDone, cancellationToken);
    }

    /// <summary>As <see cref="MigrationStream.CopyAsSaved(VmStateReader, VmStateWriter, bool, out long?, IProgress{long}?, CancellationToken)"/>, noting the pages.</summary>
    public MigrationStreamInfo CopyAsSaved(VmStateReader source, VmStateWriter destination, bool markRunning, out long? guestClockNanoseconds,
        IProgress<long>? ramBytesDone = null, CancellationToken cancellationToken = default) =>
        MigrationStream.CopyAsSaved(source, destination, markRunning, Index, out guestClockNanoseconds, ramBytesDone, cancellationToken);
}
