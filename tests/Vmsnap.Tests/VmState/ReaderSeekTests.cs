using CsCheck;
using Vmsnap.Storage;
using Vmsnap.VmState;

namespace Vmsnap.Tests.VmState;

/// <summary>Seeking a reader (streams laid out by offset): every position reads the bytes that are there.</summary>
[Collection(NativeMemoryCollection.Name)]
[Trait("Category", "Unit")]
public sealed class ReaderSeekTests
{
    [Fact]
    public void Seeks_back_and_forth_read_the_bytes_at_each_position()
    {
        long live = AlignedBuffer.LiveCount;
        Gen.Int[0, int.MaxValue].Sample(seed =>
        {
            var r = new Random(seed);
            byte[] bytes = WriterScript.Bytes(r, r.Next(1, 3 << 20));
            int bufferSize = 4096 * r.Next(1, 64);
            using var reader = new VmStateReader(new MemoryVmStateBackend(bytes), bufferSize, r.Next(1, 5));
            Assert.True(reader.CanSeek);
            for (int i = 0; i < 30; i++)
            {
                long to = r.Next(3) switch
                {
                    0 => r.Next(bytes.Length),                                          // anywhere
                    1 => Math.Min(bytes.Length - 1, reader.Position + r.Next(1, 20000)), // a short hop ahead
                    _ => Math.Max(0, reader.Position - r.Next(1, 20000)),                // a short hop back
                };
                reader.Seek(to);
                Assert.Equal(to, reader.Position);
                int n = (int)Math.Min(bytes.Length - to, r.Next(1, 3 * bufferSize));
                Assert.True(reader.ReadSpan(n).SequenceEqual(bytes.AsSpan((int)to, n)), $"seek to {to}, {n} bytes");
            }
            // Past the end: the read says where the data ran out.
            reader.Seek(bytes.Length);
            var e = Assert.Throws<VmStateException>(() => reader.GetByte());
            Assert.Contains($"offset {bytes.Length}", e.Message);
        }, iter: 40, threads: 1);
        Assert.Equal(live, AlignedBuffer.LiveCount);
    }

    [Fact]
    public void A_channel_seeks_forward_by_reading_and_refuses_to_go_back()
    {
        byte[] bytes = WriterScript.Bytes(new Random(3), 100_000);
        using var reader = new VmStateReader(VmStateBackend.ForStream(new MemoryStream(bytes)), 4096);
        Assert.False(reader.CanSeek);
        reader.Seek(50_000);
        Assert.Equal(bytes[50_000], reader.GetByte());
        var e = Assert.Throws<VmStateException>(() => reader.Seek(10));
        Assert.Contains("in order only", e.Message);
    }
}
