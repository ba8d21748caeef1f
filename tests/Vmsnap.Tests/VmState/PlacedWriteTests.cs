using CsCheck;
using Vmsnap.Storage;
using Vmsnap.VmState;

namespace Vmsnap.Tests.VmState;

/// <summary>
/// Writes placed by offset (a stream that seeks, and page regions put at positions beside it, as a
/// mapped-ram file is laid out): gather and buffered mode give the bytes of a plain model in which
/// every write lands where it says and the last write of a byte wins, whatever order the buffered
/// writes complete in.
/// </summary>
[Collection(NativeMemoryCollection.Name)]
[Trait("Category", "Unit")]
public sealed class PlacedWriteTests
{
    private const int RegionStart = 2 << 20;
    private const int RegionBytes = 1 << 20;

    private abstract record Op;

    private sealed record StreamPut(byte[] Data) : Op;

    private sealed record StreamSeek(long Position) : Op;

    private sealed record Placed(long Position, byte[] Data, bool ZeroGap) : Op;

    /// <summary>
    /// A script: the stream writes and seeks forward below <see cref="RegionStart"/>; placed writes land in
    /// the region, mostly page after page (with holes), sometimes again over earlier ones. A gap is said
    /// to hold nothing only when nothing was ever written there.
    /// </summary>
    private static (List<Op> Ops, byte[] Expected) Script(int seed)
    {
        var r = new Random(seed);
        var ops = new List<Op>();
        byte[] model = new byte[RegionStart + RegionBytes];
        bool[] written = new bool[model.Length];
        long stream = 0, placedEnd = RegionStart;
        int count = r.Next(1, 60);
        for (int i = 0; i < count; i++)
        {
            switch (r.Next(6))
            {
                case 0:
                case 1:
                {
                    byte[] data = WriterScript.Bytes(r, r.Next(1, r.Next(2) == 0 ? 200 : 70_000));
                    if (stream + data.Length > RegionStart) break;
                    ops.Add(new StreamPut(data));
                    Apply(stream, data);
                    stream += data.Length;
                    break;
                }
                case 2:
                {
                    long to = stream + (r.Next(2) == 0 ? r.Next(1, 5000) : r.Next(4096, 300_000));
                    if (r.Next(2) == 0) to = (to + 4095) / 4096 * 4096;
                    if (to > RegionStart - 1) break;
                    ops.Add(new StreamSeek(to));
                    stream = to;
                    break;
                }
                default:
                {
                    int pages = r.Next(1, 40);
                    long at = r.Next(5) switch
                    {
                        0 => RegionStart + (long)r.Next(RegionBytes / 4096 - pages) * 4096,               // anywhere, maybe over earlier pages
                        1 => Math.Min(placedEnd + r.Next(1, 9) * 4096, RegionStart + RegionBytes - pages * 4096), // after a hole
                        2 => RegionStart + r.Next(RegionBytes - pages * 4096),                             // unaligned
                        _ => Math.Min(placedEnd, RegionStart + RegionBytes - pages * 4096),                 // right after the last
                    };
                    byte[] data = WriterScript.Bytes(r, pages * 4096 - (r.Next(4) == 0 ? r.Next(1, 4096) : 0));
                    bool free = at > placedEnd && !written.AsSpan((int)placedEnd, (int)(at - placedEnd)).Contains(true);
                    ops.Add(new Placed(at, data, free && r.Next(3) != 0));
                    Apply(at, data);
                    placedEnd = at + data.Length;
                    break;
                }
            }
        }
        // The model is as long as the furthest byte written.
        int length = written.AsSpan().LastIndexOf(true) + 1;
        return (ops, model[..length]);

        void Apply(long position, byte[] data)
        {
            data.CopyTo(model, position);
            written.AsSpan((int)position, data.Length).Fill(true);
        }
    }

    private static void Run(VmStateWriter writer, List<Op> ops)
    {
        foreach (Op op in ops)
        {
            switch (op)
            {
                case StreamPut p:
                    writer.PutBuffer(p.Data);
                    break;
                case StreamSeek s:
                    writer.Seek(s.Position);
                    Assert.Equal(s.Position, writer.Tell());
                    break;
                case Placed p:
                    writer.PutAt(p.Position, p.Data, p.ZeroGap);
                    break;
            }
        }
    }

    [Fact]
    public void Gather_and_buffered_modes_give_the_models_bytes_with_writes_completing_out_of_order()
    {
        long live = AlignedBuffer.LiveCount;
        int reordered = 0;
        Gen.Int[0, int.MaxValue].Sample(seed =>
        {
            var (ops, expected) = Script(seed);

            var gather = new MemoryVmStateBackend();
            using (var writer = new VmStateWriter(gather, new VmStateWriterOptions { Mode = VmStateWriteMode.Gather }))
            {
                Run(writer, ops);
                writer.Close();
            }
            Assert.Equal(expected, gather.ToArray());

            var r = new Random(seed);
            var memory = new MemoryVmStateBackend { PrefersBuffered = true };
            using var backend = new FaultInjectingBackend(memory, seed) { MaxJitterMilliseconds = r.Next(3) };
            using (var writer = new VmStateWriter(backend, new VmStateWriterOptions { BufferCount = r.Next(1, 5), BufferSize = 4096 * r.Next(1, 9) }))
            {
                Run(writer, ops);
                writer.Close();
            }
            Assert.Equal(expected, memory.ToArray());
            if (backend.CompletedOutOfOrder) Interlocked.Increment(ref reordered);
        }, iter: 40, threads: 1);
        Assert.Equal(live, AlignedBuffer.LiveCount);
        Assert.True(reordered > 0, "no run completed its writes out of order");
    }

    [Fact]
    public void An_aligned_page_region_goes_out_in_whole_aligned_buffers()
    {
        var memory = new MemoryVmStateBackend { PrefersBuffered = true };
        using var backend = new FaultInjectingBackend(memory);
        byte[] page = new byte[4096];
        using (var writer = new VmStateWriter(backend, new VmStateWriterOptions { BufferCount = 4, BufferSize = 64 << 10 }))
        {
            writer.PutBuffer(new byte[100]);                 // the stream: short and unaligned
            for (int p = 0; p < 64; p++)
            {
                page[0] = (byte)p;
                // A hole every 8 pages that holds nothing: written as zeroes inside the buffer (a hole at a
                // buffer's end would just end that request).
                long at = (1 << 20) + p * 4096L;
                if (p % 8 == 3) continue;
                writer.PutAt(at, page, zeroGap: true);
            }
            writer.Close();
        }
        var placed = backend.Writes.Where(w => w.Position >= 1 << 20).OrderBy(w => w.Position).ToList();
        Assert.Equal(4, placed.Count);
        Assert.All(placed, w => Assert.True(w.Position % 4096 == 0 && w.Length % 4096 == 0 && w.MemoryAligned, $"write {w.Position}+{w.Length}"));
        Assert.Equal([64 << 10, 64 << 10, 64 << 10, 64 << 10], placed.Select(w => w.Length));
        byte[] all = memory.ToArray();
        Assert.Equal(5, all[(1 << 20) + 5 * 4096]);
        Assert.Equal(0, all[(1 << 20) + 3 * 4096]);
    }

    [Fact]
    public void A_channel_refuses_seeks_and_placed_writes()
    {
        using var backend = VmStateBackend.ForStream(new MemoryStream());
        using var writer = new VmStateWriter(backend);
        Assert.Throws<InvalidOperationException>(() => writer.Seek(10));
        Assert.Throws<InvalidOperationException>(() => writer.PutAt(0, new byte[1]));
    }
}
