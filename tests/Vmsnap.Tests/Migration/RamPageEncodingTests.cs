using Vmsnap.Migration;
using static Vmsnap.Tests.Migration.StreamFiles;

namespace Vmsnap.Tests.Migration;

/// <summary>The RAM page records against byte layouts built by hand from the format facts.</summary>
[Trait("Category", "Unit")]
public class RamPageEncodingTests
{
    private sealed class Owner : IDisposable
    {
        public int Disposed;
        public void Dispose() => Disposed++;
    }

    [Fact]
    public void Pages_are_named_on_a_block_switch_and_after_a_reset_and_continue_otherwise()
    {
        var random = new Random(1);
        byte[] p1 = StreamBuilder.RandomPage(random), p2 = StreamBuilder.RandomPage(random), p3 = StreamBuilder.RandomPage(random);
        byte[] zero = new byte[4096];
        var owners = new[] { new Owner(), new Owner(), new Owner(), new Owner() };
        long pages = 0, zeroPages = 0;

        var (bytes, _) = WriteBytes(w =>
        {
            var encoder = new RamPageEncoder(w);
            encoder.EncodePages("ram0", 0, (byte[])[.. p1, .. zero], owners[0]);
            encoder.ResetBlock();
            encoder.EncodePages("ram0", 0x2000, zero, owners[1]);
            encoder.EncodePages("pc.bios", 0, p2, owners[2]);
            encoder.EncodePages("pc.bios", 0x1000, p3, owners[3]);
            pages = encoder.Pages;
            zeroPages = encoder.ZeroPages;
            return 0;
        });

        byte[] expected = new StreamBuilder()
            .Be64(0x0000 | 0x08).Id("ram0").Raw(p1)            // first page: PAGE + id
            .Be64(0x1000 | 0x02 | 0x20).U8(0)                  // same block: ZERO | CONTINUE, one 0 byte
            .Be64(0x2000 | 0x02).Id("ram0").U8(0)              // after ResetBlock: named again
            .Be64(0x0000 | 0x08).Id("pc.bios").Raw(p2)         // block switch: named
            .Be64(0x1000 | 0x08 | 0x20).Raw(p3)                // CONTINUE
            .ToArray();
        Assert.Equal(expected, bytes);
        Assert.Equal(5, pages); // zero pages included
        Assert.Equal(2, zeroPages);
        Assert.All(owners, o => Assert.Equal(1, o.Disposed));
    }

    [Fact]
    public void A_single_non_zero_byte_anywhere_makes_a_data_page()
    {
        foreach (int position in new[] { 0, 1, 7, 8, 15, 16, 31, 32, 63, 64, 127, 2048, 4031, 4064, 4088, 4094, 4095 })
        {
            byte[] page = new byte[4096];
            page[position] = 0x80;
            var (bytes, _) = WriteBytes(w =>
            {
                new RamPageEncoder(w).EncodePages("r", 0, page);
                return 0;
            });
            Assert.Equal(new StreamBuilder().Be64(0x08).Id("r").Raw(page).ToArray(), bytes);
        }
    }

    [Fact]
    public void Page_runs_that_are_not_whole_pages_are_refused()
    {
        WriteBytes(w =>
        {
            var encoder = new RamPageEncoder(w);
            Assert.Throws<ArgumentException>(() => encoder.EncodePages("r", 0, new byte[4095]));
            Assert.ThrowsAny<ArgumentException>(() => encoder.EncodePages("r", 100, new byte[4096]));
            return 0;
        });
    }
}
