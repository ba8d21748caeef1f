using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.Diagnostics;
using System.Net.Sockets;
using System.Text;
using Vmsnap.Storage;
using Vmsnap.Storage.LowLevel;
using Vmsnap.VmState;
using Vmsnap.VmState.LowLevel;

namespace Vmsnap.Migration.LowLevel;

/// <summary>What a postcopy source did: pages sent because the destination asked for them, pages sent in the background, and when.</summary>
/// <param name="PagesOnDemand">Pages the destination asked for (REQ_PAGES) before they had been sent.</param>
/// <param name="PagesStreamed">Pages sent in the background, in the snapshot's order.</param>
/// <param name="SecondsToLastPage">Seconds from the device state's package (or the resume) to the last page written.</param>
/// <param name="PagesAlreadyThere">On a resume (<see cref="PostcopySource.Resume"/>): pages the destination had received before the cut.</param>
public sealed record PostcopySourceResult(long PagesOnDemand, long PagesStreamed, double SecondsToLastPage, long PagesAlreadyThere = 0);

/// <summary>
/// Where a snapshot's pages and device state lie, from one pass over its stream (<see cref="PostcopySource.Scan"/>):
/// what a <see cref="PostcopySource"/> serves pages from.
/// </summary>
public sealed class PostcopyIndex
{
    internal PostcopyIndex(MigrationStreamIndex pages, MigrationStreamInfo info)
    {
        Pages = pages;
        Info = info;
    }

    internal MigrationStreamIndex Pages { get; }

    /// <summary>What the stream holds (format, RAM blocks, sections).</summary>
    public MigrationStreamInfo Info { get; }

    /// <summary>Why the stream cannot be served by postcopy (yet), or null when it can.</summary>
    public string? Problem => PostcopySource.Problem(Pages);
}

/// <summary>
/// The source side of QEMU's postcopy protocol, serving a recorded stream (a snapshot's VM state): the destination gets
/// the header, configuration, OPEN_RETURN_PATH, POSTCOPY_ADVISE and the RAM section's block list, then one PACKAGED
/// command holding LISTEN, every device section and RUN, so it starts the guest before any page; then every page once,
/// in RAM section parts: those the destination asks for on the return path first, the others behind them in the
/// stream's order; then the RAM section's end and EOF.
/// </summary>
/// <remarks>
/// <para>Facts from QEMU's migration/savevm.c, ram.c, postcopy-ram.c and migration.c (7.2 to 10.2): the destination
/// must have <c>postcopy-ram</c> set before <c>migrate-incoming</c>; ADVISE carries be64 the OR of the RAM blocks' page
/// sizes and be64 the target page size, and the destination refuses values that differ from its own; a block whose page
/// size differs from the host's gets a be64 page size in the block list (never here: only 4 KiB pages are served);
/// the package holds no EOF (the stream goes on); the destination places each page once (UFFDIO_COPY/ZEROPAGE, a second
/// placement fails with EEXIST) and refuses a ZERO record whose fill byte is not 0.</para>
/// <para>Return path messages: be16 type, be16 length, then SHUT (1, be32 error), PONG (2, be32), REQ_PAGES_ID (3: be64
/// offset, be32 length, u8 length and the block's id) and REQ_PAGES (4: be64 offset, be32 length, the block of the
/// previous request), RECV_BITMAP (5: u8 length and the block's id, then outside the message's length be64 the bitmap's
/// bytes, the bitmap as little-endian 64-bit words, be64 0x0123456789abcdef) and RESUME_ACK (6, be32 1).</para>
/// <para>Recovery (<see cref="Resume"/>), from QEMU's postcopy_do_resume, ram_dirty_bitmap_sync_all and
/// loadvm_postcopy_handle_resume: a destination whose source went away after RUN waits in <c>postcopy-paused</c>; given a
/// new channel (<c>migrate-recover</c>) it reads commands again where a section begins, with no stream header. The source
/// asks for each RAM block's received bitmap (RECV_BITMAP, command 10: u8 length and the block's id), sends
/// POSTCOPY_RESUME (9), gets RESUME_ACK, then the destination asks again for the pages its faulting threads wait on
/// (naming the block first), and the source sends every page not received in a new RAM section part.</para>
/// </remarks>
public sealed class PostcopySource
{
    private const ushort ReturnShut = 1;
    private const ushort ReturnPong = 2;
    private const ushort ReturnRequestPagesId = 3;
    private const ushort ReturnRequestPages = 4;
    private const ushort ReturnReceivedBitmap = 5;
    private const ushort ReturnResumeAck = 6;

    /// <summary>The end mark after a received bitmap (QEMU's RAMBLOCK_RECV_BITMAP_ENDING).</summary>
    private const ulong ReceivedBitmapEnd = 0x0123456789abcdef;

    /// <summary>RESUME_ACK's value (QEMU's MIGRATION_RESUME_ACK_VALUE).</summary>
    private const uint ResumeAckValue = 1;

    /// <summary>
    /// The PING inside the package, between the device state and RUN: its PONG says the device state is loaded (which may
    /// have needed pages: QEMU reads virtio rings in guest RAM while loading devices) and RUN is next in the same buffer.
    /// </summary>
    private const uint RunPing = 0x766d736e;

    /// <summary>The size of the pages served (the target page size: only 4 KiB pages are served).</summary>
    public const int PageBytes = MigrationFormat.PageSize;

    /// <summary>The largest package QEMU 7.2 accepts (its MAX_VM_CMD_PACKAGED_SIZE, 16 MiB; later QEMUs accept up to 4 GiB).</summary>
    public const int MaxPackageBytes = 1 << 24;

    /// <summary>Bytes gathered before a background write: small, so a requested page waits little behind them.</summary>
    private const int WriteBytes = 64 << 10;

    private readonly MigrationStreamIndex _index;
    private readonly IBlockDevice _snapshot;
    private readonly Socket _channel;
    private readonly IProgress<long>? _progress;
    private readonly ulong[][] _sent;
    private readonly Dictionary<string, int> _blockByName;
    private readonly byte[][] _blockIds;
    private readonly uint _ramSection;

    private readonly ConcurrentQueue<(int Block, long Page, long Count)> _requests = new();
    private readonly byte[] _out = GC.AllocateUninitializedArray<byte>(WriteBytes + 2 * (MigrationFormat.PageSize + 300));
    private readonly byte[] _page = new byte[MigrationFormat.PageSize];
    private int _used;
    private int _lastBlock = -1;
    private long _delivered;
    private long _onDemand;
    private long _streamed;
    private volatile string? _returnPathProblem;
    private volatile bool _shut;
    private volatile bool _running;
    private long _alreadyThere;
    private Thread? _returnPath;

    /// <param name="index">Where the stream's pages and device state lie (one pass over it).</param>
    /// <param name="snapshot">The stream's bytes, at their stream offsets (a snapshot's VM-state area), for single reads.</param>
    /// <param name="channel">The migration channel: the main stream goes out, the return path comes back on it.</param>
    /// <param name="pagesDelivered">Told the count of pages sent so far, now and then.</param>
    public PostcopySource(PostcopyIndex index, IBlockDevice snapshot, Socket channel, IProgress<long>? pagesDelivered = null)
    {
        Refuse(index.Pages);
        _index = index.Pages;
        _snapshot = snapshot;
        _channel = channel;
        _progress = pagesDelivered;
        _sent = _index.Blocks.Select(b => new ulong[(b.Length / MigrationFormat.PageSize + 63) / 64]).ToArray();
        _blockByName = _index.Blocks.Select((b, i) => (b.Id, i)).ToDictionary(x => x.Id, x => x.i);
        _blockIds = _index.Blocks.Select(b => Encoding.UTF8.GetBytes(b.Id)).ToArray();
        _ramSection = _index.RamSectionId;
    }

    /// <summary>
    /// Called on the return path's thread once the destination has loaded the device state (the PONG to the PING just
    /// before RUN, which QEMU reads next from the package it holds whole): from RUN on a lost channel leaves it in
    /// <c>postcopy-paused</c>, which a new source can resume; before, QEMU fails the load and exits.
    /// </summary>
    public Action? GuestStarted { get; init; }

    /// <summary>True once the destination has said that the device state is loaded and the guest started (see <see cref="GuestStarted"/>).</summary>
    public bool GuestStartConfirmed => _running;

    /// <summary>Pages of guest RAM the stream's blocks hold.</summary>
    public long TotalPages => _index.Blocks.Sum(b => b.Length / MigrationFormat.PageSize);

    /// <summary>
    /// One pass over a stream (its page data skipped): the index a source needs (where each page and the device state lie)
    /// and what the stream holds.
    /// </summary>
    /// <exception cref="MigrationStreamException">The stream is malformed or uses something vmsnap does not read.</exception>
    public static PostcopyIndex Scan(VmStateReader stream, long length, CancellationToken cancellationToken)
    {
        var index = new MigrationStreamIndex();
        var summary = new MigrationStreamSummary();
        foreach (MigrationRecord record in MigrationStream.Records(new MigrationRecordReader(stream, length, pageData: false), summary, null, cancellationToken))
            index.Add(record);
        return new PostcopyIndex(index, summary.ToInfo());
    }

    /// <summary>Why a stream cannot be served by postcopy (yet), or null.</summary>
    internal static string? Problem(MigrationStreamIndex index)
    {
        if (index.IsMappedRam) return "not supported yet: postcopy of a mapped-ram stream";
        if (index.RamStart is null || index.ConfigurationEnd < 0) return "the stream has no configuration or no RAM section";
        if (index.Blocks.FirstOrDefault(b => b.Length % MigrationFormat.PageSize != 0) is { } odd)
            return $"RAM block '{odd.Id}' is {odd.Length} bytes, not a whole number of pages";
        if (index.DeviceStateOffset < 0 || index.EofOffset < index.DeviceStateOffset) return "the stream has no device state after its RAM";
        if (index.EofOffset - index.DeviceStateOffset + 19 > MaxPackageBytes)
            return $"the device state is {index.EofOffset - index.DeviceStateOffset} bytes; a postcopy package holds at most {MaxPackageBytes}";
        return null;
    }

    private static void Refuse(MigrationStreamIndex index)
    {
        if (Problem(index) is { } problem) throw new MigrationStreamException(problem, index.RamStartOffset);
    }

    /// <summary>
    /// Sends everything up to the device state's package: after it the destination loads the devices and starts the
    /// guest, asking for each page it touches. Starts reading the return path. The package has a PING just before RUN,
    /// whose PONG tells when the destination reached the state a lost channel can be resumed from (<see cref="GuestStarted"/>).
    /// </summary>
    /// <exception cref="IOException">Reading the snapshot failed.</exception>
    /// <exception cref="SocketException">The channel failed (the destination went away).</exception>
    public void SendDeviceState()
    {
        // Header and configuration (and whatever else precedes the RAM section's start) as recorded.
        Copy(0, _index.ConfigurationEnd, "the stream's header and configuration");
        PutCommand(MigrationFormat.CommandOpenReturnPath, []);
        byte[] advise = new byte[16];
        BinaryPrimitives.WriteUInt64BigEndian(advise, MigrationFormat.PageSize);   // every block's page size: 4 KiB
        BinaryPrimitives.WriteUInt64BigEndian(advise.AsSpan(8), MigrationFormat.PageSize);
        PutCommand(MigrationFormat.CommandPostcopyAdvise, advise);
        foreach ((long offset, long length) in _index.EarlySections) Copy(offset, length, "an early-setup section");
        PutRamStart();
        PutDiscard();
        Flush();

        _returnPath = new Thread(ReadReturnPath) { IsBackground = true, Name = "postcopy return path" };
        _returnPath.Start();

        // The package: LISTEN, the device sections as recorded (up to the stream's EOF), PING, RUN. The PING goes before RUN:
        // QEMU stops reading the package at RUN (LOADVM_QUIT), so a command after it is never read.
        long deviceBytes = _index.EofOffset - _index.DeviceStateOffset;
        byte[] package = new byte[5 + deviceBytes + 9 + 5];
        WriteCommand(package, MigrationFormat.CommandPostcopyListen, 0);
        ReadExactly(package.AsSpan(5, (int)deviceBytes), _index.DeviceStateOffset, "the device state");
        WriteCommand(package.AsSpan(5 + (int)deviceBytes), MigrationFormat.CommandPing, 4);
        BinaryPrimitives.WriteUInt32BigEndian(package.AsSpan(10 + (int)deviceBytes), RunPing);
        WriteCommand(package.AsSpan(14 + (int)deviceBytes), MigrationFormat.CommandPostcopyRun, 0);
        Span<byte> head = stackalloc byte[7];
        head[0] = MigrationFormat.Command;
        BinaryPrimitives.WriteUInt16BigEndian(head[1..], MigrationFormat.CommandPackaged);
        BinaryPrimitives.WriteUInt16BigEndian(head[3..], 4);
        Put(head[..5]);
        Span<byte> packageLength = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(packageLength, (uint)package.Length);
        Put(packageLength);
        Flush();
        _channel.Send(package);
        // The pages' section part: one for the whole postcopy phase.
        PutSectionHeader(MigrationFormat.SectionPart);
        Flush();
    }

    /// <summary>
    /// Sends every page once: requested ones first, the rest as the stream holds them (read in order from
    /// <paramref name="stream"/>); then the RAM section's end and EOF. Returns when the last byte is written.
    /// </summary>
    /// <exception cref="MigrationStreamException">The stream read differently from the index, or the destination said something unexpected.</exception>
    public PostcopySourceResult SendPages(VmStateReader stream, long length)
    {
        var clock = Stopwatch.StartNew();
        var reader = new MigrationRecordReader(stream, length, pageData: true, runBytes: MigrationRecordReader.CopyRunBytes);
        while (reader.Next() is { } record)
        {
            ServeRequests();
            switch (record)
            {
                case RamPagesRecord pages:
                    for (int i = 0; i < pages.PageCount; i++)
                    {
                        long page = pages.BlockOffset / MigrationFormat.PageSize + i;
                        PageLocation at = _index.Find(pages.Block, page);
                        if (at.Kind == PageKind.Data && at.Offset == pages.DataOffsetOf(i) && !IsSent(pages.Block, page))
                            PutPage(pages.Block, page, pages.Data.Span.Slice(i * MigrationFormat.PageSize, MigrationFormat.PageSize), demanded: false);
                    }
                    break;
                case RamZeroPagesRecord zero:
                    for (int i = 0; i < zero.PageCount; i++)
                    {
                        long page = zero.BlockOffset / MigrationFormat.PageSize + i;
                        if (_index.Find(zero.Block, page).Kind == PageKind.Filled && !IsSent(zero.Block, page)) PutFilled(zero.Block, page, demanded: false);
                    }
                    break;
                case DeviceSectionRecord { Kind: MigrationSectionKind.Device } or UnwalkedDeviceStateRecord or EofRecord or VmDescriptionRecord:
                    goto pagesDone;   // the RAM is behind: no need to read the device state again
            }
        }
    pagesDone:
        // Pages the stream never carried are zero for a destination that loads it whole: the same here.
        for (int block = 0; block < _sent.Length; block++)
        {
            long pages = _index.Blocks[block].Length / MigrationFormat.PageSize;
            for (long page = 0; page < pages; page++)
            {
                if ((page & 63) == 0 && _sent[block][page >> 6] == ulong.MaxValue) { page += 63; continue; }
                if (!IsSent(block, page)) PutFilled(block, page, demanded: false);
                if ((page & 1023) == 0) ServeRequests();
            }
        }
        Span<byte> eos = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(eos, MigrationFormat.RamEos);
        Put(eos);
        PutFooter();
        PutSectionHeader(MigrationFormat.SectionEnd);
        Put(eos);
        PutFooter();
        Put([MigrationFormat.Eof]);
        Flush();
        double seconds = clock.Elapsed.TotalSeconds;
        _progress?.Report(_delivered);
        return new PostcopySourceResult(_onDemand, _streamed, seconds, _alreadyThere);
    }

    /// <summary>Waits until the destination closes the return path (SHUT after its last page, or the channel closing).</summary>
    /// <returns>Null when the destination said it finished without error; else what went wrong.</returns>
    public string? WaitForShut(TimeSpan timeout)
    {
        if (_returnPath is not null && !_returnPath.Join(timeout)) return $"the destination did not close its return path within {timeout.TotalSeconds:0} s";
        return _shut ? null : _returnPathProblem ?? "the return path closed without SHUT";
    }

    /// <summary>The reason the return path stopped, if it did (a closed channel, an error the destination reported).</summary>
    public string? ReturnPathProblem => _returnPathProblem;

    /// <summary>
    /// The source side of QEMU's postcopy recovery, on a new channel to a destination in <c>postcopy-recover</c> (after
    /// <c>migrate-recover</c>): asks for every RAM block's received bitmap, takes those pages as delivered, sends
    /// POSTCOPY_RESUME and waits for RESUME_ACK; then starts reading the return path (the destination asks again for the
    /// pages its guest waits on) and opens the RAM section part the pages go in. <see cref="SendPages"/> follows.
    /// </summary>
    /// <exception cref="MigrationStreamException">The destination answered something other than the protocol (a block it does not
    /// have, a bitmap of another size, a wrong end mark), or did not answer within <paramref name="timeout"/>.</exception>
    /// <exception cref="SocketException">The channel failed.</exception>
    public void Resume(TimeSpan timeout)
    {
        for (int block = 0; block < _blockIds.Length; block++)
        {
            byte[] payload = new byte[1 + _blockIds[block].Length];
            payload[0] = (byte)_blockIds[block].Length;
            _blockIds[block].CopyTo(payload, 1);
            PutCommand(MigrationFormat.CommandRecvBitmap, payload);
        }
        Flush();

        int oldTimeout = _channel.ReceiveTimeout;
        _channel.ReceiveTimeout = (int)Math.Min(int.MaxValue, timeout.TotalMilliseconds);
        try
        {
            byte[] message = new byte[4 + ushort.MaxValue];
            var answered = new bool[_blockIds.Length];
            for (int received = 0; received < _blockIds.Length;)
            {
                (ushort type, int length) = ReceiveMessage(message, "the received bitmaps");
                Span<byte> data = message.AsSpan(4, length);
                if (type != ReturnReceivedBitmap)
                    throw new MigrationStreamException($"the destination answered return-path message {type} ({data.Length} bytes) to RECV_BITMAP");
                string name = data.Length > 0 && 1 + data[0] <= data.Length ? Encoding.UTF8.GetString(data.Slice(1, data[0])) : "";
                if (!_blockByName.TryGetValue(name, out int block) || answered[block])
                    throw new MigrationStreamException($"the destination sent a received bitmap of RAM block '{name}', which was not asked for");
                ReceiveBitmap(block);
                answered[block] = true;
                received++;
            }
            PutCommand(MigrationFormat.CommandPostcopyResume, []);
            Flush();
            (ushort ack, int ackLength) = ReceiveMessage(message, "RESUME_ACK");
            Span<byte> value = message.AsSpan(4, ackLength);
            if (ack != ReturnResumeAck || value.Length < 4 || BinaryPrimitives.ReadUInt32BigEndian(value) != ResumeAckValue)
                throw new MigrationStreamException($"the destination answered return-path message {ack} ({value.Length} bytes) to POSTCOPY_RESUME, not RESUME_ACK");
        }
        finally
        {
            _channel.ReceiveTimeout = oldTimeout;
        }
        _running = true;   // the destination runs the guest already; a lost channel pauses it again
        _returnPath = new Thread(ReadReturnPath) { IsBackground = true, Name = "postcopy return path" };
        _returnPath.Start();
        PutSectionHeader(MigrationFormat.SectionPart);
        Flush();
    }

    /// <summary>A block's received bitmap (after its RECV_BITMAP message): be64 byte count, little-endian words, be64 end mark.</summary>
    private void ReceiveBitmap(int block)
    {
        string id = _index.Blocks[block].Id;
        long pages = _index.Blocks[block].Length / MigrationFormat.PageSize;
        Span<byte> be = stackalloc byte[8];
        ReceiveOrFail(be, $"the received bitmap of RAM block '{id}'");
        long bytes = (long)BinaryPrimitives.ReadUInt64BigEndian(be);
        long expected = (pages + 63) / 64 * 8;
        if (bytes != expected)
            throw new MigrationStreamException($"the destination's RAM block '{id}' has a received bitmap of {bytes} bytes; the snapshot's block needs {expected} " +
                "(the destination's RAM differs from the snapshot's)");
        byte[] bitmap = new byte[bytes];
        ReceiveOrFail(bitmap, $"the received bitmap of RAM block '{id}'");
        ReceiveOrFail(be, $"the received bitmap of RAM block '{id}'");
        if (BinaryPrimitives.ReadUInt64BigEndian(be) != ReceivedBitmapEnd)
            throw new MigrationStreamException($"the received bitmap of RAM block '{id}' ends with 0x{BinaryPrimitives.ReadUInt64BigEndian(be):x16}, not QEMU's end mark");
        ulong[] words = RamBitmap.Parse(bitmap, pages);
        for (int i = 0; i < words.Length; i++)
        {
            _sent[block][i] |= words[i];
            _alreadyThere += System.Numerics.BitOperations.PopCount(words[i]);
        }
    }

    private (ushort Type, int Length) ReceiveMessage(byte[] message, string waitingFor)
    {
        ReceiveOrFail(message.AsSpan(0, 4), waitingFor);
        ushort type = BinaryPrimitives.ReadUInt16BigEndian(message);
        int length = BinaryPrimitives.ReadUInt16BigEndian(message.AsSpan(2));
        ReceiveOrFail(message.AsSpan(4, length), waitingFor);
        return (type, length);
    }

    private void ReceiveOrFail(Span<byte> into, string waitingFor)
    {
        try
        {
            if (!Receive(into)) throw new MigrationStreamException($"the destination closed the channel while vmsnap waited for {waitingFor}");
        }
        catch (SocketException e) when (e.SocketErrorCode is SocketError.TimedOut or SocketError.WouldBlock)
        {
            throw new MigrationStreamException($"the destination did not send {waitingFor} within {_channel.ReceiveTimeout / 1000} s");
        }
    }

    private void ServeRequests()
    {
        bool any = false;
        while (_requests.TryDequeue(out var request))
        {
            for (long page = request.Page; page < request.Page + request.Count; page++)
            {
                if (IsSent(request.Block, page)) continue;
                PageLocation at = _index.Find(request.Block, page);
                if (at.Kind == PageKind.Data)
                {
                    Span<byte> data = _page;
                    ReadExactly(data, at.Offset, $"page {page} of RAM block '{_index.Blocks[request.Block].Id}'");
                    PutPage(request.Block, page, data, demanded: true);
                }
                else
                {
                    PutFilled(request.Block, page, demanded: true);
                }
                any = true;
            }
        }
        if (any) Flush();
    }

    private bool IsSent(int block, long page) => RamBitmap.IsSet(_sent[block], page);

    private void MarkSent(int block, long page, bool demanded)
    {
        RamBitmap.Set(_sent[block], page);
        if (demanded) _onDemand++;
        else _streamed++;
        if ((++_delivered & 4095) == 0) _progress?.Report(_delivered);
    }

    private void PutPage(int block, long page, ReadOnlySpan<byte> data, bool demanded)
    {
        PutRecordHeader(block, page, MigrationFormat.RamPage);
        Put(data);
        MarkSent(block, page, demanded);
        if (_used >= WriteBytes) Flush();
    }

    /// <summary>A page of one byte: a ZERO record when it is 0 (the only fill QEMU's postcopy accepts), else its data.</summary>
    private void PutFilled(int block, long page, bool demanded)
    {
        byte fill = _index.Find(block, page) is { Kind: PageKind.Filled } at ? at.Fill : (byte)0;
        if (fill != 0)
        {
            Span<byte> data = _page;
            data.Fill(fill);
            PutPage(block, page, data, demanded);
            return;
        }
        PutRecordHeader(block, page, MigrationFormat.RamZero);
        Put([0]);
        MarkSent(block, page, demanded);
        if (_used >= WriteBytes) Flush();
    }

    private void PutRecordHeader(int block, long page, ulong flags)
    {
        Span<byte> header = stackalloc byte[8];
        bool same = block == _lastBlock;
        BinaryPrimitives.WriteUInt64BigEndian(header, (ulong)(page * MigrationFormat.PageSize) | flags | (same ? MigrationFormat.RamContinue : 0));
        Put(header);
        if (!same)
        {
            Put([(byte)_blockIds[block].Length]);
            Put(_blockIds[block]);
            _lastBlock = block;
        }
    }

    /// <summary>SECTION_START of the RAM section with its block list (4 KiB pages: no page sizes), EOS and footer.</summary>
    private void PutRamStart()
    {
        RamStartRecord start = _index.RamStart!;
        Put([MigrationFormat.SectionStart]);
        Span<byte> be = stackalloc byte[8];
        BinaryPrimitives.WriteUInt32BigEndian(be, start.SectionId);
        Put(be[..4]);
        byte[] name = Encoding.UTF8.GetBytes(MigrationFormat.RamSectionName);
        Put([(byte)name.Length]);
        Put(name);
        BinaryPrimitives.WriteUInt32BigEndian(be, start.Instance);
        Put(be[..4]);
        BinaryPrimitives.WriteUInt32BigEndian(be, start.Version);
        Put(be[..4]);
        BinaryPrimitives.WriteUInt64BigEndian(be, (ulong)start.RamBytes | MigrationFormat.RamMemSize);
        Put(be);
        for (int i = 0; i < start.Blocks.Count; i++)
        {
            Put([(byte)_blockIds[i].Length]);
            Put(_blockIds[i]);
            BinaryPrimitives.WriteUInt64BigEndian(be, (ulong)start.Blocks[i].Length);
            Put(be);
        }
        BinaryPrimitives.WriteUInt64BigEndian(be, MigrationFormat.RamEos);
        Put(be);
        PutFooter();
    }

    /// <summary>
    /// One POSTCOPY_RAM_DISCARD of the first block's first page (which the destination has not received: it discarded all
    /// its RAM at ADVISE). QEMU (7.2 to 10.2) needs one: LISTEN without a discard before it leaves the destination in the
    /// DISCARD state, and it then refuses RUN ("CMD_POSTCOPY_RUN in wrong postcopy state (2)", measured on 7.2).
    /// Payload: u8 version 0, u8 length and the block's id, a 0 byte, then be64 start and be64 length in bytes.
    /// </summary>
    private void PutDiscard()
    {
        byte[] id = _blockIds[0];
        byte[] payload = new byte[3 + id.Length + 16];
        payload[1] = (byte)id.Length;
        id.CopyTo(payload, 2);
        BinaryPrimitives.WriteUInt64BigEndian(payload.AsSpan(3 + id.Length + 8), MigrationFormat.PageSize);
        PutCommand(MigrationFormat.CommandPostcopyRamDiscard, payload);
    }

    private void PutSectionHeader(byte type)
    {
        Span<byte> header = stackalloc byte[5];
        header[0] = type;
        BinaryPrimitives.WriteUInt32BigEndian(header[1..], _ramSection);
        Put(header);
        _lastBlock = -1;   // each section record names its first block again, as QEMU's source does
    }

    private void PutFooter()
    {
        Span<byte> footer = stackalloc byte[5];
        footer[0] = MigrationFormat.SectionFooter;
        BinaryPrimitives.WriteUInt32BigEndian(footer[1..], _ramSection);
        Put(footer);
    }

    private void PutCommand(ushort command, ReadOnlySpan<byte> payload)
    {
        Span<byte> head = stackalloc byte[5];
        head[0] = MigrationFormat.Command;
        BinaryPrimitives.WriteUInt16BigEndian(head[1..], command);
        BinaryPrimitives.WriteUInt16BigEndian(head[3..], (ushort)payload.Length);
        Put(head);
        Put(payload);
    }

    private static void WriteCommand(Span<byte> into, ushort command, ushort payloadLength)
    {
        into[0] = MigrationFormat.Command;
        BinaryPrimitives.WriteUInt16BigEndian(into[1..], command);
        BinaryPrimitives.WriteUInt16BigEndian(into[3..], payloadLength);
    }

    /// <summary>Copies the recorded bytes [offset, offset + length) to the output.</summary>
    private void Copy(long offset, long length, string what)
    {
        byte[] buffer = new byte[Math.Min(length, 1 << 20)];
        for (long done = 0; done < length;)
        {
            int n = (int)Math.Min(buffer.Length, length - done);
            ReadExactly(buffer.AsSpan(0, n), offset + done, what);
            Flush();
            _channel.Send(buffer.AsSpan(0, n));
            done += n;
        }
    }

    private void ReadExactly(Span<byte> into, long offset, string what)
    {
        int n = _snapshot.Read(into, offset);
        if (n != into.Length)
            throw new MigrationStreamException($"the stream ends before {what} ({into.Length} bytes at offset {offset}, {n} read)", offset);
    }

    private void Put(ReadOnlySpan<byte> bytes)
    {
        if (_used + bytes.Length > _out.Length) Flush();
        if (bytes.Length > _out.Length)
        {
            _channel.Send(bytes);
            return;
        }
        bytes.CopyTo(_out.AsSpan(_used));
        _used += bytes.Length;
    }

    private void Flush()
    {
        int done = 0;
        while (done < _used) done += _channel.Send(_out.AsSpan(done, _used - done));
        _used = 0;
    }

    /// <summary>The return path: page requests go to the queue the sender serves first; SHUT or a closed channel ends it.</summary>
    private void ReadReturnPath()
    {
        byte[] message = new byte[4 + ushort.MaxValue];
        int lastBlock = -1;
        try
        {
            while (true)
            {
                if (!Receive(message.AsSpan(0, 4))) { _returnPathProblem ??= "the destination closed the channel"; return; }
                ushort type = BinaryPrimitives.ReadUInt16BigEndian(message);
                int length = BinaryPrimitives.ReadUInt16BigEndian(message.AsSpan(2));
                Span<byte> data = message.AsSpan(4, length);
                if (!Receive(data)) { _returnPathProblem ??= "the destination closed the channel inside a return-path message"; return; }
                switch (type)
                {
                    case ReturnShut:
                        uint error = length >= 4 ? BinaryPrimitives.ReadUInt32BigEndian(data) : 0;
                        if (error != 0) _returnPathProblem = $"the destination reported error {error} (SHUT)";
                        else _shut = true;
                        return;
                    case ReturnPong:
                        if (length >= 4 && BinaryPrimitives.ReadUInt32BigEndian(data) == RunPing && !_running)
                        {
                            _running = true;
                            GuestStarted?.Invoke();
                        }
                        break;
                    case ReturnRequestPagesId or ReturnRequestPages when length >= 12:
                    {
                        long start = (long)BinaryPrimitives.ReadUInt64BigEndian(data);
                        long bytes = BinaryPrimitives.ReadUInt32BigEndian(data[8..]);
                        if (type == ReturnRequestPagesId)
                        {
                            int nameLength = length > 12 ? data[12] : -1;
                            string name = nameLength >= 0 && 13 + nameLength <= length ? Encoding.UTF8.GetString(data.Slice(13, nameLength)) : "";
                            if (!_blockByName.TryGetValue(name, out lastBlock))
                            {
                                _returnPathProblem = $"the destination asked for a page of RAM block '{name}', which the snapshot does not hold";
                                return;
                            }
                        }
                        if (lastBlock < 0) { _returnPathProblem = "the destination asked for a page without naming its RAM block"; return; }
                        long blockPages = _index.Blocks[lastBlock].Length / MigrationFormat.PageSize;
                        long first = start / MigrationFormat.PageSize;
                        long count = Math.Max(1, bytes / MigrationFormat.PageSize);
                        if (start % MigrationFormat.PageSize != 0 || first + count > blockPages)
                        {
                            _returnPathProblem = $"the destination asked for {bytes} bytes at 0x{start:x} of RAM block '{_index.Blocks[lastBlock].Id}', outside it";
                            return;
                        }
                        _requests.Enqueue((lastBlock, first, count));
                        break;
                    }
                    default:
                        _returnPathProblem = $"unexpected return-path message {type} ({length} bytes)";
                        return;
                }
            }
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
            _returnPathProblem ??= $"the return path failed: {e.Message}";
        }
    }

    private bool Receive(Span<byte> into)
    {
        int done = 0;
        while (done < into.Length)
        {
            int n = _channel.Receive(into[done..]);
            if (n == 0) return false;
            done += n;
        }
        return true;
    }
}
