using Vmsnap.Storage;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Storage;

[Trait("Category", "Unit")]
public class FileBlockDeviceTests
{
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Positional_writes_read_back_aligned_and_unaligned(bool direct)
    {
        using var dir = new TempDir();
        string path = dir.File("f");
        using (var dev = FileBlockDevice.Open(path, new FileBlockDeviceOptions { Create = true, Direct = direct }))
        {
            using var aligned = new AlignedBuffer(8192);
            new Random(1).NextBytes(aligned.GetSpan());
            dev.Write(aligned.GetSpan(), 4096);              // direct path when enabled
            dev.Write([1, 2, 3], 5);                          // unaligned path
            dev.Flush();
            Assert.Equal(4096 + 8192, dev.Length);
            using var back = new AlignedBuffer(8192);
            Assert.Equal(8192, dev.Read(back.GetSpan(), 4096));
            Assert.True(aligned.GetSpan().SequenceEqual(back.GetSpan()));
        }
        byte[] all = File.ReadAllBytes(path);
        Assert.Equal(new byte[] { 1, 2, 3 }, all[5..8]);
    }

    [Fact]
    public async Task Many_async_writes_in_flight_land_at_their_offsets()
    {
        using var dir = new TempDir();
        using var dev = FileBlockDevice.Open(dir.File("f"), new FileBlockDeviceOptions { Create = true, Direct = true });
        var buffers = Enumerable.Range(0, 16).Select(i => { var b = new AlignedBuffer(65536); b.GetSpan().Fill((byte)i); return b; }).ToArray();
        await Task.WhenAll(buffers.Select((b, i) => dev.WriteAsync(b.Memory, (long)i * 65536).AsTask()));
        byte[] back = new byte[65536];
        for (int i = 0; i < 16; i++)
        {
            dev.Read(back, (long)i * 65536);
            Assert.All(back, x => Assert.Equal((byte)i, x));
        }
        foreach (var b in buffers) b.Dispose();
    }

    [Fact]
    public void Discard_reads_back_zeroes_and_keeps_length()
    {
        using var dir = new TempDir();
        using var dev = FileBlockDevice.Open(dir.File("f"), new FileBlockDeviceOptions { Create = true });
        dev.Write(Enumerable.Repeat((byte)0xAB, 1 << 20).ToArray(), 0);
        dev.Discard(4096, 65536);
        byte[] back = new byte[1 << 20];
        dev.Read(back, 0);
        Assert.Equal(1 << 20, dev.Length);
        Assert.All(back[4096..(4096 + 65536)], x => Assert.Equal(0, x));
        Assert.Equal(0xAB, back[4095]);
        Assert.Equal(0xAB, back[4096 + 65536]);
    }

    [Fact]
    public void Opening_a_missing_file_names_it()
    {
        var e = Assert.Throws<StorageException>(() => FileBlockDevice.Open("/nonexistent/x.qcow2"));
        Assert.Contains("/nonexistent/x.qcow2", e.Message);
    }

    [Fact]
    public void A_length_the_device_cannot_have_is_a_storage_error_that_changes_nothing()
    {
        using var dir = new TempDir();
        string path = dir.File("big");
        using (var file = FileBlockDevice.Open(path, new FileBlockDeviceOptions { Create = true }))
        {
            file.Write(new byte[4096], 0);
            var e = Assert.Throws<StorageException>(() => file.SetLength(1L << 62));   // past any file system's limit
            Assert.Equal(27, e.ErrorCode);   // EFBIG
            Assert.Contains(path, e.Message);
            Assert.Equal(4096, file.Length);
        }
        var memory = new MemoryBlockDevice(new byte[100]);
        Assert.Throws<StorageException>(() => memory.SetLength(3L << 30));
        Assert.Throws<StorageException>(() => memory.Write(new byte[1], Array.MaxLength));
        Assert.Equal(100, memory.Length);
    }
}
