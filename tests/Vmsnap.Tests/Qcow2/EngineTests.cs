using Vmsnap.Qcow2;
using Vmsnap.Storage;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Qcow2;

/// <summary>The engine's internal API the snapshot work builds on, concurrency, and crash consistency.</summary>
[Trait("Category", "Unit")]
public class EngineTests
{
    [QemuFact]
    public void The_vm_state_area_past_the_disk_grows_the_L1_table_and_stays_consistent()
    {
        using var dir = new TempDir();
        string image = dir.File("vm.qcow2");
        Qemu.Create(image, 64 << 20);
        Qemu.Io(image, "write -P 0x31 0 1M");
        byte[] state = new byte[5 << 20];
        new Random(4).NextBytes(state);
        long vmOffset;
        ulong oldL1;
        using (var img = Qcow2Image.Open(image))
        {
            Qcow2Engine e = img.Engine;
            vmOffset = e.VmStateOffset;
            Assert.Equal(512L << 20, vmOffset);   // one L1 entry maps the 64 MiB disk; the VM state starts at the next
            oldL1 = e.State.Header.L1TableOffset;
            Assert.Equal(1, e.State.ActiveL1.Size);
            e.WriteGuest(state, vmOffset + 12345);
            Assert.True(e.State.ActiveL1.Size >= 2);
            Assert.NotEqual(oldL1, e.State.Header.L1TableOffset);
            Assert.Throws<ArgumentOutOfRangeException>(() => img.Read(new byte[1], 64 << 20));
            Assert.Throws<ArgumentOutOfRangeException>(() => img.Write(new byte[1], vmOffset));
        }
        Qcow2Header h = Qemu.Header(image);
        Assert.True(h.L1Size >= 2);
        QemuImgCheck.AssertClean(image);
        using (var img = Qcow2Image.Open(image))
        {
            byte[] back = new byte[state.Length];
            img.Engine.ReadGuest(back, vmOffset + 12345);
            Assert.Equal(state, back);
            // Dropping the VM state again (as savevm does once the snapshot holds it) frees it all.
            img.Engine.ZeroOrDiscard(vmOffset, 8 << 20, discard: true);
            img.Engine.ReadGuest(back, vmOffset + 12345);
            Assert.All(back, b => Assert.Equal(0, b));
        }
        QemuImgCheck.AssertClean(image);
        string raw = Qemu.ToRaw(image, dir);
        Assert.All(Qemu.ReadRaw(raw, 0, 1 << 20), b => Assert.Equal(0x31, b));
    }

    [QemuFact]
    public void Refcount_primitives_allocate_contiguous_runs_and_free_them()
    {
        using var dir = new TempDir();
        string image = dir.File("rc.qcow2");
        Qemu.Create(image, 64 << 20, "cluster_size=4k");
        Qemu.Io(image, "write -P 0x31 0 40k");
        long run;
        using (var img = Qcow2Image.Open(image))
        {
            Qcow2Engine e = img.Engine;
            lock (e.SyncRoot)
            {
                run = e.Refcounts.Allocate(5);
                for (int i = 0; i < 5; i++) Assert.Equal(1UL, e.Refcounts.Get((run >> 12) + i));
                e.State.Device.Write(new byte[5 * 4096], run);   // check only sees clusters inside the file
                e.Caches.FlushAll();
            }
        }
        (var json, int exit) = QemuImgCheck.Of(image);
        Assert.Equal(3, exit);
        Assert.Equal(5, QemuImgCheck.Field(json, "leaks"));      // allocated, referenced by nothing
        using (var img = Qcow2Image.Open(image))
        {
            Qcow2Engine e = img.Engine;
            lock (e.SyncRoot)
            {
                e.Refcounts.Free(run, 5 * 4096);
                Assert.Equal(0UL, e.Refcounts.Get(run >> 12));
                Assert.Throws<Qcow2FormatException>(() => e.Refcounts.Update(run, 1, -1));   // below zero: refused
                e.Caches.FlushAll();
            }
        }
        QemuImgCheck.AssertClean(image);
    }

    [QemuTheory]
    [InlineData("cluster_size=512")]
    [InlineData("")]
    [InlineData("cluster_size=16k,extended_l2=on")]
    public async Task Concurrent_writers_and_readers_on_disjoint_ranges(string options)
    {
        using var dir = new TempDir();
        string image = dir.File("c.qcow2");
        long size = 32 << 20;
        Qemu.Create(image, size, options);
        Qemu.Io(image, "write -P 0x31 0 8M");
        Tool.QemuImg("snapshot", "-c", "s", image);   // so that writes also copy on write
        string expected = Qemu.ToRaw(image, dir);
        const int threads = 6;
        int stripe = 96 * 1024;   // thread t owns stripes t, t + threads, ...: neighbours share L2 tables and refcount blocks
        var writes = new List<(long, byte[])>[threads];
        using (var img = Qcow2Image.Open(image))
        {
            var tasks = Enumerable.Range(0, threads).Select(t => Task.Run(() =>
            {
                var random = new Random(t);
                writes[t] = [];
                for (int i = 0; i < 60; i++)
                {
                    long s = (random.Next(0, (int)(size / stripe) / threads) * threads + t) * (long)stripe;
                    int within = random.Next(0, stripe - 1);
                    int length = random.Next(1, stripe - within);
                    byte[] data = new byte[length];
                    random.NextBytes(data);
                    img.Write(data, s + within);
                    writes[t].Add((s + within, data));
                    byte[] back = new byte[length];
                    img.Read(back, s + within);
                    Assert.Equal(data, back);
                    if (i % 20 == 0) img.Flush();
                }
            })).ToArray();
            await Task.WhenAll(tasks);
        }
        foreach (var list in writes) foreach ((long offset, byte[] data) in list) Qemu.WriteRaw(expected, offset, data);
        QemuImgCheck.AssertClean(image);
        Qemu.AssertSameContent(image, expected);
    }

    [QemuFact]
    public async Task Direct_io_and_async_writes_in_flight()
    {
        using var dir = new TempDir();
        string image = dir.File("direct.qcow2");
        long size = 64 << 20;
        Qemu.Create(image, size);
        string expected = Qemu.SparseRaw(dir, "expected.raw", size);
        var buffers = Enumerable.Range(0, 12).Select(i =>
        {
            var b = new AlignedBuffer(1 << 20);
            new Random(i).NextBytes(b.GetSpan());
            return b;
        }).ToArray();
        using (var img = Qcow2Image.Open(image, new Qcow2OpenOptions { Direct = true }))
        {
            Assert.True(((FileBlockDevice)img.Engine.State.Device).IsDirect);
            // Aligned 1 MiB writes (the O_DIRECT path), eight or more in flight at once.
            await Task.WhenAll(buffers.Select((b, i) => img.Engine.WriteGuestAsync(b.Memory, (long)i * (3 << 20)).AsTask()));
            for (int i = 0; i < buffers.Length; i++) Qemu.WriteRaw(expected, (long)i * (3 << 20), buffers[i].GetSpan());
            img.Write(new byte[] { 1, 2, 3 }, 4097);   // unaligned: through the page cache
            Qemu.WriteRaw(expected, 4097, new byte[] { 1, 2, 3 });
            using var back = new AlignedBuffer(1 << 20);
            await img.Engine.ReadGuestAsync(back.Memory, 3L << 20);
            Assert.True(back.GetSpan().SequenceEqual(buffers[1].GetSpan()));
        }
        foreach (var b in buffers) b.Dispose();
        QemuImgCheck.AssertClean(image);
        Qemu.AssertSameContent(image, expected);
    }

    [QemuFact]
    public void Copied_flags_can_be_recomputed_from_refcounts()
    {
        using var dir = new TempDir();
        string image = dir.File("copied.qcow2");
        Qemu.Create(image, 64 << 20, "cluster_size=4k");
        Qemu.Io(image, "write -P 1 0 100k", "write -P 2 5M 30k");
        Tool.QemuImg("snapshot", "-c", "s", image);
        Qemu.Io(image, "write -P 3 8k 8k");   // some clusters exclusive again, most shared
        // Flip every COPIED flag of the active tables.
        Qcow2Header h = Qemu.Header(image);
        for (int i = 0; i < h.L1Size; i++)
        {
            long at = (long)h.L1TableOffset + i * 8L;
            ulong l1 = Qemu.ReadBE64(image, at);
            if (l1 == 0) continue;
            Qemu.WriteBE64(image, at, l1 ^ L1Entry.Copied);
            long l2 = (long)(l1 & L1Entry.OffsetMask);
            for (int j = 0; j < 512; j++)
            {
                ulong e = Qemu.ReadBE64(image, l2 + j * 8L);
                if ((e & L2Entry.OffsetMask) != 0) Qemu.WriteBE64(image, l2 + j * 8L, e ^ L2Entry.Copied);
            }
        }
        Assert.True(QemuImgCheck.Field(QemuImgCheck.Of(image).Json, "corruptions") > 2);
        using (var img = Qcow2Image.Open(image)) img.Check(Qcow2RepairMode.All);
        QemuImgCheck.AssertClean(image);
    }

    /// <summary>A device that remembers every write and flush, to rebuild what a crash could leave on disk.</summary>
    private sealed class RecordingDevice(byte[] initial) : IBlockDevice
    {
        private readonly MemoryBlockDevice _inner = new(initial);
        internal readonly List<(long Offset, byte[]? Data, long NewLength)> Log = [];
        internal readonly List<int> Barriers = [];   // log positions at which a flush completed

        public long Length => _inner.Length;
        public bool IsReadOnly => false;
        public int Alignment => 1;
        public int Read(Span<byte> buffer, long offset) => _inner.Read(buffer, offset);
        public void Write(ReadOnlySpan<byte> buffer, long offset)
        {
            lock (Log) Log.Add((offset, buffer.ToArray(), 0));
            _inner.Write(buffer, offset);
        }
        public ValueTask<int> ReadAsync(Memory<byte> buffer, long offset, CancellationToken ct = default) => _inner.ReadAsync(buffer, offset, ct);
        public ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, long offset, CancellationToken ct = default)
        {
            Write(buffer.Span, offset);
            return ValueTask.CompletedTask;
        }
        public void Flush()
        {
            lock (Log) Barriers.Add(Log.Count);
        }
        public void SetLength(long length)
        {
            lock (Log) Log.Add((0, null, length));
            _inner.SetLength(length);
        }
        public void Discard(long offset, long length) => Write(new byte[length], offset);
        public void Dispose() { }

        /// <summary>Applies log entries [from, to) that <paramref name="keep"/> selects.</summary>
        internal void Replay(MemoryBlockDevice target, int from, int to, Func<int, bool> keep)
        {
            for (int i = from; i < to; i++)
            {
                if (!keep(i)) continue;
                (long offset, byte[]? data, long length) = Log[i];
                if (data is null) target.SetLength(length);
                else target.Write(data, offset);
            }
        }
    }

    [QemuTheory]
    [InlineData("", 1)]
    [InlineData("cluster_size=512", 2)]
    [InlineData("cluster_size=16k,extended_l2=on", 3)]
    [InlineData("compat=0.10,cluster_size=4k", 4)]
    public void A_crash_at_any_point_leaves_no_corruption_only_leaks(string options, int seed)
    {
        using var dir = new TempDir();
        string file = dir.File("crash.qcow2");
        long size = 16 << 20;
        Qemu.Create(file, size, options);
        Qemu.Io(file, "write -P 0x31 0 3M", "write -P 0x32 9M 1M");
        Tool.QemuImg("snapshot", "-c", "s", file);
        byte[] initial = File.ReadAllBytes(file);
        var device = new RecordingDevice(initial);
        var random = new Random(seed);
        // The guest's disk as the test wrote it, kept at each completed flush: what a crash must keep
        // (data written after the last flush may be old or new).
        byte[] model = File.ReadAllBytes(Qemu.ToRaw(file, dir));
        var flushed = new List<(int Barriers, int NextOp, byte[] Model)> { (0, 0, (byte[])model.Clone()) };
        var touched = new List<(int Op, long Offset, int Length)>();
        using (var img = Qcow2Image.Open(device, "crash"))
        {
            img.Engine.State.L2Cache.Capacity = 4;   // evictions write tables back between operations
            Qcow2Engine e = img.Engine;
            for (int i = 0; i < 40; i++)
            {
                int length = random.Next(1, i % 7 == 0 ? 3 << 20 : 100_000);
                long offset = random.NextInt64(0, size - length);
                byte[] data = new byte[length];
                random.NextBytes(data);
                switch (i % 10)
                {
                    case 3: img.WriteZeroes(offset, length); Array.Clear(model, (int)offset, length); break;
                    case 6: img.Discard(offset, length); break;   // whole clusters read as zero after it: judged as touched
                    case 8: e.WriteGuest(data, e.VmStateOffset + offset); break;   // grows the L1 table
                    default: img.Write(data, offset); data.CopyTo(model, offset); break;
                }
                if (i % 10 != 8) touched.Add((i, offset, length));
                if (i % 10 == 6)
                {
                    byte[] now = new byte[length];
                    img.Read(now, offset);
                    now.CopyTo(model, offset);
                }
                if (i % 9 == 0)
                {
                    img.Flush();
                    flushed.Add((device.Barriers.Count, i + 1, (byte[])model.Clone()));
                }
            }
        }
        Assert.True(device.Barriers.Count > 3);

        // What a crash can leave: everything up to a completed flush, plus any subset of the writes after it.
        int checkedStates = 0, qemuChecked = 0;
        var starts = new List<int> { 0 };
        starts.AddRange(device.Barriers);
        var stableState = new MemoryBlockDevice(initial);
        int applied = 0;
        // At most ~50 crash points, spread over the run (each one replays and checks three images).
        int step = Math.Max(1, starts.Count / 50);
        for (int b = 0; b < starts.Count; b++)
        {
            int stable = starts[b];
            if (b % step != 0 && b != starts.Count - 1) continue;
            int next = b + 1 < starts.Count ? starts[b + 1] : device.Log.Count;
            device.Replay(stableState, applied, stable, _ => true);
            applied = stable;
            next = Math.Max(next, stable);
            for (int variant = 0; variant < 3; variant++)
            {
                var pick = new Random(b * 31 + variant);
                var state = new MemoryBlockDevice(stableState.ToArray());
                if (variant > 0) device.Replay(state, stable, next, _ => pick.Next(2) == 0);
                using var img = Qcow2Image.Open(state, $"state {b}/{variant}", new Qcow2OpenOptions { ReadOnly = true });
                Qcow2CheckResult r = img.Check();
                Assert.True(r.Corruptions == 0 && r.CheckErrors == 0,
                    $"crash after flush {b}, variant {variant}: {string.Join("\n", r.Messages.Take(10))}");
                AssertFlushedDataSurvives(img, b, variant);
                checkedStates++;
                if ((b + variant) % 7 == 0 && qemuChecked < 12)
                {
                    string path = dir.File($"state{b}-{variant}.qcow2");
                    File.WriteAllBytes(path, state.ToArray());
                    (var json, _) = QemuImgCheck.Of(path);
                    Assert.True(QemuImgCheck.Field(json, "corruptions") == 0, $"qemu-img check of crash state {b}/{variant}: {json}");
                    qemuChecked++;
                }
            }
        }
        Assert.True(checkedStates > 10);

        // Every byte the last flush completed before the crash covered reads as it was then, unless a later operation touched it.
        void AssertFlushedDataSurvives(Qcow2Image img, int barriersDone, int variant)
        {
            (_, int nextOp, byte[] expected) = flushed.Last(f => f.Barriers <= barriersDone);
            byte[] actual = new byte[size];
            img.Read(actual, 0);
            var later = touched.Where(t => t.Op >= nextOp).Select(t => (Start: t.Offset, End: t.Offset + t.Length)).OrderBy(r => r.Start).ToList();
            long pos = 0;
            foreach ((long start, long end) in later.Append((size, size)))
            {
                if (start > pos)
                {
                    int at = expected.AsSpan((int)pos, (int)(start - pos)).CommonPrefixLength(actual.AsSpan((int)pos, (int)(start - pos)));
                    long i = pos + at;
                    if (i < start)
                        Assert.Fail($"crash after flush {barriersDone}, variant {variant}: guest byte {i} reads 0x{actual[i]:x2}, but 0x{expected[i]:x2} was flushed");
                }
                pos = Math.Max(pos, end);
            }
        }
    }
}
