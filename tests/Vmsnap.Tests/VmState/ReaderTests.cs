using CsCheck;
using Vmsnap.Storage;
using Vmsnap.VmState;

namespace Vmsnap.Tests.VmState;

/// <summary>The reader gives back what the writer wrote, in any chunking, and names the offset where data ran out.</summary>
[Collection(NativeMemoryCollection.Name)]
[Trait("Category", "Unit")]
public sealed class ReaderTests
{
    /// <summary>Readers of every kind over <paramref name="bytes"/>: read-ahead on a positional backend, or sequential on a channel.</summary>
    private static VmStateReader Open(byte[] bytes, bool positional, int bufferSize, int readAhead = 4) =>
        positional
            ? new VmStateReader(new MemoryVmStateBackend(bytes), bufferSize, readAhead)
            : new VmStateReader(VmStateBackend.ForStream(new MemoryStream(bytes)), bufferSize);

    private static byte[] Write(List<WriterOp> ops)
    {
        using var backend = new MemoryVmStateBackend();
        using var writer = new VmStateWriter(backend);
        WriterScript.Run(writer, ops, checkTell: false);
        writer.Close();
        return backend.ToArray();
    }

    /// <summary>Reads back what <paramref name="op"/> wrote, checking the value.</summary>
    private static void ReadBack(VmStateReader reader, WriterOp op, bool useSpan)
    {
        switch (op)
        {
            case ByteOp o: Assert.Equal(o.Value, reader.GetByte()); break;
            case Be16Op o: Assert.Equal(o.Value, reader.GetBe16()); break;
            case Be32Op o: Assert.Equal(o.Value, reader.GetBe32()); break;
            case Be64Op o: Assert.Equal(o.Value, reader.GetBe64()); break;
            case BufferOp o: ReadBytes(reader, o.Data, useSpan); break;
            case AsyncOp o: ReadBytes(reader, o.Array.AsSpan(o.Offset, o.Length).ToArray(), useSpan); break;
            case NativeAsyncOp o: ReadBytes(reader, o.Data, useSpan); break;
        }
    }

    private static void ReadBytes(VmStateReader reader, byte[] expected, bool useSpan)
    {
        if (useSpan)
        {
            Assert.True(reader.ReadSpan(expected.Length).SequenceEqual(expected));
            return;
        }
        byte[] got = new byte[expected.Length];
        reader.Read(got);
        Assert.Equal(expected, got);
    }

    [Fact]
    public void Typed_gets_read_back_what_the_writer_put()
    {
        long live = AlignedBuffer.LiveCount;
        Gen.Int[0, int.MaxValue].Sample(seed =>
        {
            byte[] bytes = Write(WriterScript.Generate(seed));
            var r = new Random(seed);
            bool positional = r.Next(2) == 0;
            using var reader = Open(bytes, positional, positional ? 4096 * r.Next(1, 5) : r.Next(1, 3000), r.Next(1, 5));
            var ops = WriterScript.Generate(seed);
            foreach (WriterOp op in ops) ReadBack(reader, op, r.Next(2) == 0);
            Assert.Equal(bytes.Length, reader.Position);
            Assert.Equal(0, reader.Peek(new byte[1]));
            var e = Assert.Throws<VmStateException>(() => reader.GetBe32());
            Assert.Contains($"ends at stream offset {bytes.Length}", e.Message);
        }, iter: 100, threads: 1);
        Assert.Equal(live, AlignedBuffer.LiveCount);
    }

    [Theory]
    [InlineData(false, 61)]
    [InlineData(false, 4096)]
    [InlineData(true, 4096)]
    [InlineData(true, 8192)]
    public void Truncated_input_fails_with_the_offset_where_data_ran_out(bool positional, int bufferSize)
    {
        var ops = WriterScript.Generate(77, maxOps: 60, maxLarge: 12000);
        byte[] whole = Write(WriterScript.Generate(77, maxOps: 60, maxLarge: 12000));
        var r = new Random(5);
        // Every cut near the start and near each buffer boundary, and random cuts elsewhere.
        var cuts = new SortedSet<int>(Enumerable.Range(0, 40));
        for (int b = bufferSize; b < whole.Length; b += bufferSize)
            for (int d = -9; d <= 9; d++) cuts.Add(Math.Clamp(b + d, 0, whole.Length - 1));
        for (int i = 0; i < 150; i++) cuts.Add(r.Next(whole.Length));
        foreach (int cut in cuts)
        {
            using var reader = Open(whole[..cut], positional, bufferSize);
            long start = 0;
            VmStateException? failure = null;
            foreach (WriterOp op in ops)
            {
                start = reader.Position;
                try
                {
                    ReadBack(reader, op, useSpan: (cut & 1) == 0);
                }
                catch (VmStateException e)
                {
                    failure = e;
                    break;
                }
                Assert.True(reader.Position <= cut);
            }
            Assert.NotNull(failure);
            // The call that failed was the first to need bytes past the cut.
            Assert.True(start <= cut);
            Assert.Contains($"ends at stream offset {cut}:", failure.Message);
            Assert.Contains($"expected at offset {start}", failure.Message);
        }
    }

    [Fact]
    public void Skip_and_peek_past_the_end()
    {
        byte[] bytes = Enumerable.Range(0, 10000).Select(i => (byte)i).ToArray();
        foreach (bool positional in new[] { false, true })
        {
            using var reader = Open(bytes, positional, 4096);
            reader.Skip(5000);
            byte[] peek = new byte[6000];
            Assert.Equal(5000, reader.Peek(peek));
            Assert.Equal(bytes[5000..], peek[..5000]);
            Assert.Equal(5000, reader.Position);
            var e = Assert.Throws<VmStateException>(() => reader.Skip(5001));
            Assert.Contains("ends at stream offset 10000:", e.Message);
        }
    }

    [Fact]
    public void Read_ahead_reader_gives_the_same_bytes_as_a_plain_reader_for_random_chunkings()
    {
        long live = AlignedBuffer.LiveCount;
        Gen.Int[0, int.MaxValue].Sample(seed =>
        {
            var r = new Random(seed);
            byte[] bytes = WriterScript.Bytes(r, r.Next(1, 300_000));
            using var ahead = Open(bytes, positional: true, 4096 * r.Next(1, 9), r.Next(1, 6));
            using var plain = Open(bytes, positional: false, r.Next(1, 5000));
            while (plain.Position < bytes.Length)
            {
                int left = (int)(bytes.Length - plain.Position);
                int n = Math.Min(left, r.Next(3) == 0 ? r.Next(1, 20000) : r.Next(1, 16));
                int pos = (int)plain.Position;
                switch (r.Next(6))
                {
                    case 0:
                    {
                        byte[] a = new byte[n], b = new byte[n];
                        ahead.Read(a);
                        plain.Read(b);
                        Assert.Equal(b, a);
                        Assert.Equal(bytes.AsSpan(pos, n).ToArray(), a);
                        break;
                    }
                    case 1:
                        Assert.True(ahead.ReadSpan(n).SequenceEqual(bytes.AsSpan(pos, n)));
                        Assert.True(plain.ReadSpan(n).SequenceEqual(bytes.AsSpan(pos, n)));
                        break;
                    case 2:
                    {
                        byte[] a = new byte[n + r.Next(0, 100)], b = new byte[a.Length];
                        int na = ahead.Peek(a), nb = plain.Peek(b);
                        Assert.Equal(Math.Min(a.Length, left), na);
                        Assert.Equal(na, nb);
                        Assert.Equal(b, a);
                        Assert.Equal(bytes.AsSpan(pos, na).ToArray(), a[..na]);
                        break;
                    }
                    case 3:
                        ahead.Skip(n);
                        plain.Skip(n);
                        break;
                    case 4 when left >= 8:
                        Assert.Equal(plain.GetBe64(), ahead.GetBe64());
                        break;
                    default:
                        Assert.Equal(bytes[pos], ahead.GetByte());
                        Assert.Equal(bytes[pos], plain.GetByte());
                        break;
                }
                Assert.Equal(plain.Position, ahead.Position);
            }
            Assert.Equal(0, ahead.Peek(new byte[1]));
        }, iter: 80, threads: 1);
        Assert.Equal(live, AlignedBuffer.LiveCount);
    }

    [Fact]
    public void A_failing_backend_read_is_reported_with_the_stream_offset()
    {
        long live = AlignedBuffer.LiveCount;
        byte[] bytes = new byte[5 * 4096];
        var backend = new FaultInjectingBackend(new MemoryVmStateBackend(bytes)) { FailAtRead = 3 };
        using (var reader = new VmStateReader(backend, 4096, readAhead: 1))
        {
            reader.Skip(2 * 4096);
            var e = Assert.Throws<VmStateException>(() => reader.GetByte());
            Assert.Contains("stream offset 8192", e.Message);
            Assert.IsType<StorageException>(e.InnerException);
        }
        Assert.Equal(live, AlignedBuffer.LiveCount);
    }
}
