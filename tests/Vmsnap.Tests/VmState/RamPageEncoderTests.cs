using System.Text;
using Vmsnap.Migration;
using Vmsnap.VmState;

namespace Vmsnap.Tests.VmState;

/// <summary>RAM page records byte for byte as QEMU's format has them, built here by hand from the format facts.</summary>
[Trait("Category", "Unit")]
public sealed class RamPageEncoderTests
{
    private const int Page = 4096;
    private const ulong Zero = 0x02, Data = 0x08, Continue = 0x20;

    /// <summary>The expected stream, appended field by field.</summary>
    private sealed class Expect
    {
        private readonly List<byte> _bytes = new();

        public byte[] Bytes => _bytes.ToArray();

        public Expect Be64(ulong v)
        {
            for (int s = 56; s >= 0; s -= 8) _bytes.Add((byte)(v >> s));
            return this;
        }

        public Expect Id(string id)
        {
            _bytes.Add((byte)id.Length);
            _bytes.AddRange(Encoding.ASCII.GetBytes(id));
            return this;
        }

        public Expect Raw(ReadOnlySpan<byte> b)
        {
            _bytes.AddRange(b.ToArray());
            return this;
        }

        public Expect U8(byte b)
        {
            _bytes.Add(b);
            return this;
        }
    }

    private static byte[] RandomPage(int seed)
    {
        byte[] p = new byte[Page];
        new Random(seed).NextBytes(p);
        p[0] |= 1;
        return p;
    }

    private static byte[] Encode(VmStateWriteMode mode, Action<RamPageEncoder> encode, out RamPageEncoder encoder)
    {
        using var backend = new MemoryVmStateBackend();
        using var writer = new VmStateWriter(backend, new VmStateWriterOptions { Mode = mode, BufferCount = 2, BufferSize = 8192 });
        encoder = new RamPageEncoder(writer);
        encode(encoder);
        writer.Close();
        return backend.ToArray();
    }

    [Theory]
    [InlineData(VmStateWriteMode.Gather)]
    [InlineData(VmStateWriteMode.Buffered)]
    public void Pages_are_encoded_as_header_block_id_when_it_changes_and_page_or_zero_byte(VmStateWriteMode mode)
    {
        byte[] p0 = RandomPage(1), p2 = RandomPage(2), p3 = RandomPage(3);
        byte[] ram = [.. p0, .. new byte[Page], .. p2];
        byte[] actual = Encode(mode, e =>
        {
            e.EncodePages("ram0", 0, ram);
            e.EncodePages("pc.bios", 0x10000, new byte[Page]);
            e.EncodePages("ram0", 3 * Page, p3);
            e.ResetBlock();
            e.EncodePages("ram0", 4 * Page, new byte[Page]);
            e.EncodePages("ram0", 5 * Page, p0);
        }, out RamPageEncoder encoder);

        byte[] expected = new Expect()
            .Be64(0 | Data).Id("ram0").Raw(p0)
            .Be64(Page | Zero | Continue).U8(0)
            .Be64(2 * Page | Data | Continue).Raw(p2)
            .Be64(0x10000 | Zero).Id("pc.bios").U8(0)
            .Be64(3 * Page | Data).Id("ram0").Raw(p3)
            .Be64(4 * Page | Zero).Id("ram0").U8(0)
            .Be64(5 * Page | Data | Continue).Raw(p0)
            .Bytes;
        Assert.Equal(expected, actual);
        Assert.Equal(7, encoder.Pages);
        Assert.Equal(3, encoder.ZeroPages);
    }

    [Fact]
    public void A_page_with_a_single_non_zero_byte_anywhere_is_sent_whole()
    {
        int[] positions = [0, 1, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256, 1000, 2047, 2048, 4031, 4032, 4088, 4094, 4095];
        byte[] pages = new byte[(positions.Length + 1) * Page];
        for (int i = 0; i < positions.Length; i++) pages[i * Page + positions[i]] = (byte)(0x80 >> (i % 8));
        byte[] actual = Encode(VmStateWriteMode.Buffered, e => e.EncodePages("ram0", 0, pages), out RamPageEncoder encoder);

        var expect = new Expect();
        for (int i = 0; i < positions.Length; i++)
        {
            expect.Be64((ulong)(i * Page) | Data | (i == 0 ? 0 : Continue));
            if (i == 0) expect.Id("ram0");
            expect.Raw(pages.AsSpan(i * Page, Page));
        }
        expect.Be64((ulong)(positions.Length * Page) | Zero | Continue).U8(0);
        Assert.Equal(expect.Bytes, actual);
        Assert.Equal(1, encoder.ZeroPages);
    }

    [Fact]
    public void In_gather_mode_the_owner_of_the_pages_is_freed_only_after_the_last_page_is_written()
    {
        byte[] pages = new byte[100 * Page];
        new Random(7).NextBytes(pages.AsSpan(0, 97 * Page));       // the last three pages are zero
        using var backend = new MemoryVmStateBackend();
        using var writer = new VmStateWriter(backend, new VmStateWriterOptions { Mode = VmStateWriteMode.Gather });
        var encoder = new RamPageEncoder(writer);
        encoder.ResetBlock();
        var owner = new TrackedOwner(() => writer.BytesTransferred);
        encoder.EncodePages("ram0", 0, pages, owner);
        long endOfLastDataPage = (8 + 1 + 4) + 97 * Page + 96 * 8;
        Assert.True(owner.DisposeCount == 0 || owner.WrittenAtDispose >= endOfLastDataPage);
        writer.Close();
        Assert.Equal(1, owner.DisposeCount);
        Assert.True(owner.WrittenAtDispose >= endOfLastDataPage, $"freed after {owner.WrittenAtDispose} bytes were written");

        // Zero pages reference nothing: their owner goes at once.
        using var backend2 = new MemoryVmStateBackend();
        using var writer2 = new VmStateWriter(backend2, new VmStateWriterOptions { Mode = VmStateWriteMode.Gather });
        var zeroOwner = new TrackedOwner();
        new RamPageEncoder(writer2).EncodePages("ram0", 0, new byte[4 * Page], zeroOwner);
        Assert.Equal(1, zeroOwner.DisposeCount);
        writer2.Close();
    }

    [Fact]
    public void Bad_arguments_are_refused_before_anything_is_written()
    {
        using var backend = new MemoryVmStateBackend();
        using var writer = new VmStateWriter(backend);
        var encoder = new RamPageEncoder(writer);
        Assert.Throws<ArgumentException>(() => encoder.EncodePages("ram0", 0, new byte[Page + 1]));
        Assert.Throws<ArgumentOutOfRangeException>(() => encoder.EncodePages("ram0", 100, new byte[Page]));
        Assert.Throws<ArgumentException>(() => encoder.EncodePages(new string('x', 256), 0, new byte[Page]));
        Assert.Throws<ArgumentException>(() => encoder.EncodePages("", 0, new byte[Page]));
        Assert.Equal(0, writer.Tell());
        Assert.Equal(0, encoder.Pages);
    }
}
