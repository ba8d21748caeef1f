using CsCheck;
using Vmsnap.Storage;
using Vmsnap.VmState;

namespace Vmsnap.Tests.VmState;

/// <summary>Random call sequences give the reference writer's bytes in every mode, with Tell right at every step.</summary>
[Collection(NativeMemoryCollection.Name)]
[Trait("Category", "Unit")]
public sealed class WriterEquivalenceTests
{
    [Fact]
    public void Gather_mode_matches_the_reference_writer()
    {
        long live = AlignedBuffer.LiveCount;
        Gen.Int[0, int.MaxValue].Sample(seed =>
        {
            byte[] expected = WriterScript.Reference(WriterScript.Generate(seed));
            using var backend = new MemoryVmStateBackend();
            List<TrackedOwner> owners;
            using (var writer = new VmStateWriter(backend, new VmStateWriterOptions { Mode = VmStateWriteMode.Gather }))
            {
                owners = WriterScript.Run(writer, WriterScript.Generate(seed));
                writer.Close();
                Assert.Equal(expected.Length, writer.BytesTransferred);
            }
            Assert.Equal(expected, backend.ToArray());
            Assert.All(owners, o => Assert.Equal(1, o.DisposeCount));
        }, iter: 150, threads: 1);
        Assert.Equal(live, AlignedBuffer.LiveCount);
    }

    [Fact]
    public void Buffered_mode_matches_the_reference_writer_for_many_buffer_counts_sizes_and_alignments_with_out_of_order_completion()
    {
        long live = AlignedBuffer.LiveCount;
        int reordered = 0;
        Gen.Int[0, int.MaxValue].Sample(seed =>
        {
            var r = new Random(seed ^ 0x5EED);
            int alignment = 4096 << r.Next(3);                 // 4, 8 or 16 KiB
            int count = r.Next(1, 9);                           // K = 1..8
            int size = alignment * r.Next(1, 9);                // B = 1..8 alignments
            byte[] expected = WriterScript.Reference(WriterScript.Generate(seed, maxLarge: 64 * 1024));
            var memory = new MemoryVmStateBackend { PrefersBuffered = true, BufferAlignment = alignment };
            using var backend = new FaultInjectingBackend(memory, seed) { MaxJitterMilliseconds = r.Next(3) };
            List<TrackedOwner> owners;
            using (var writer = new VmStateWriter(backend, new VmStateWriterOptions { BufferCount = count, BufferSize = size }))
            {
                Assert.Equal(VmStateWriteMode.Buffered, writer.Mode);
                owners = WriterScript.Run(writer, WriteScriptFor(seed));
                writer.Close();
                Assert.Equal(expected.Length, writer.BytesTransferred);
            }
            Assert.Equal(expected, memory.ToArray());
            Assert.All(owners, o => Assert.Equal(1, o.DisposeCount));
            CheckBufferedWrites(backend.Writes, expected.Length, alignment, size);
            if (backend.CompletedOutOfOrder) Interlocked.Increment(ref reordered);
        }, iter: 120, threads: 1);
        Assert.Equal(live, AlignedBuffer.LiveCount);
        // The property held while writes really completed out of order.
        Assert.True(reordered > 0, "no run completed its writes out of order");

        static List<WriterOp> WriteScriptFor(int seed) => WriterScript.Generate(seed, maxLarge: 64 * 1024);
    }

    [Fact]
    public void Gather_mode_on_a_channel_matches_the_reference_writer()
    {
        Gen.Int[0, int.MaxValue].Sample(seed =>
        {
            byte[] expected = WriterScript.Reference(WriterScript.Generate(seed));
            var stream = new MemoryStream();
            using (var backend = VmStateBackend.ForStream(stream, leaveOpen: true))
            using (var writer = new VmStateWriter(backend))
            {
                Assert.Equal(VmStateWriteMode.Gather, writer.Mode);
                WriterScript.Run(writer, WriterScript.Generate(seed));
                writer.Close();
            }
            Assert.Equal(expected, stream.ToArray());
        }, iter: 60, threads: 1);
    }

    [Fact]
    public void Gather_mode_issues_one_vectored_write_of_at_most_64_segments_per_flush_and_references_async_memory()
    {
        var memory = new MemoryVmStateBackend();
        using var backend = new FaultInjectingBackend(memory);
        using var writer = new VmStateWriter(backend);
        byte[] page = new byte[4096];
        new Random(1).NextBytes(page);
        // Header + page per step: 2 segments each, so the 32nd page fills the vector.
        for (int i = 0; i < 31; i++)
        {
            writer.PutBe64((ulong)i);
            writer.PutBufferAsync(page);
        }
        Assert.Empty(backend.Writes);
        writer.PutBe64(31);
        writer.PutBufferAsync(page);
        var first = Assert.Single(backend.Writes);
        Assert.True(first.Vectored);
        Assert.Equal(32 * (8 + 4096), first.Length);
        // Scalars alone fill the 32 KiB internal buffer before anything is written.
        for (int i = 0; i < 32 * 1024 / 8 - 1; i++) writer.PutBe64(0);
        Assert.Single(backend.Writes);
        writer.PutBe64(0);
        Assert.Equal(2, backend.Writes.Count);
        Assert.Equal(32 * 1024, backend.Writes[1].Length);
        writer.Close();
    }

    [Fact]
    public void Buffered_mode_uses_at_most_K_buffers_and_flush_writes_nothing()
    {
        long live = AlignedBuffer.LiveCount;
        var memory = new MemoryVmStateBackend { PrefersBuffered = true };
        using var backend = new FaultInjectingBackend(memory) { Latency = TimeSpan.FromMilliseconds(2) };
        using (var writer = new VmStateWriter(backend, new VmStateWriterOptions { BufferCount = 3, BufferSize = 8192 }))
        {
            writer.PutBuffer(new byte[5000]);
            writer.Flush();
            Assert.Empty(backend.Writes);
            Assert.Equal(live + 1, AlignedBuffer.LiveCount);    // allocated on first need
            for (int i = 0; i < 50; i++)
            {
                writer.PutBuffer(new byte[8192]);
                Assert.True(AlignedBuffer.LiveCount - live <= 3, "more than K buffers allocated");
            }
            writer.Close();
            Assert.Equal(live, AlignedBuffer.LiveCount);        // Close releases them
        }
        Assert.Equal(5000 + 50 * 8192, memory.Length);
    }

    [Fact]
    public void Rate_limit_keeps_the_average_rate_at_or_below_the_limit()
    {
        // 256 KiB at 1 MiB/s: at least the time of the first 224 KiB must pass before the last write.
        using var backend = new MemoryVmStateBackend();
        using var writer = new VmStateWriter(backend, new VmStateWriterOptions { RateLimit = 1 << 20 });
        var clock = System.Diagnostics.Stopwatch.StartNew();
        writer.PutBuffer(new byte[256 * 1024]);
        writer.Close();
        Assert.True(clock.Elapsed >= TimeSpan.FromSeconds(224.0 / 1024 - 0.01), $"took only {clock.Elapsed}");
        Assert.Equal(256 * 1024, writer.BytesTransferred);
    }

    /// <summary>Buffered writes: full aligned buffers at aligned positions, the exact tail last, covering the stream once.</summary>
    internal static void CheckBufferedWrites(IReadOnlyList<FaultInjectingBackend.WriteCall> writes, long total, int alignment, int size)
    {
        var sorted = writes.OrderBy(w => w.Position).ToList();
        long at = 0;
        foreach (var w in sorted)
        {
            Assert.False(w.Vectored);
            Assert.Equal(at, w.Position);
            Assert.Equal(0, w.Position % alignment);
            if (w.Position + w.Length < total)
            {
                Assert.Equal(size, w.Length);
                Assert.True(w.MemoryAligned, $"write at {w.Position} is not aligned in memory");
            }
            at += w.Length;
        }
        Assert.Equal(total, at);
        // Positions were fixed at hand-off: issued in stream order.
        Assert.Equal(sorted.Select(w => w.Index), writes.Select(w => w.Index));
    }
}
