using Vmsnap.Migration;
using Vmsnap.Tests.Interop;
using static Vmsnap.Tests.Migration.StreamFiles;

namespace Vmsnap.Tests.Migration;

/// <summary>Loading RAM into files that exist already (a QEMU memory-backend-file) and into new ones.</summary>
[Trait("Category", "Unit")]
public sealed class RamFileSinkTests(QemuStreams qemu) : IClassFixture<QemuStreams>
{
    [QemuFact]
    public void An_existing_file_full_of_other_data_is_loaded_in_place_and_ends_up_as_the_guest_ram_qemu_had()
    {
        VersionStreams q = qemu.ForCurrent();
        using var dir = new TempDir();
        string target = dir.File("ram0");
        FillFile(target, QemuStreams.RamBytes, 0xa5);
        Assert.True(q.NoneZeroPages > 0, "the guest has zero pages, which must overwrite the 0xa5 bytes");

        // A process that holds the file open (QEMU with share=on) sees the loaded RAM: the file was written, not replaced.
        using var held = new FileStream(target, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
        using (var sink = new RamFileSink(Ram(("ram0", target))) { WriteInPlace = true })
            ReadFile(q.NoneStream, r => MigrationStream.Read(r, sink));

        Assert.Equal(GuestRam.Hash(q.NoneRam), GuestRam.Hash(target));
        Assert.Equal(GuestRam.Hash(q.NoneRam), GuestRam.Hash(held));
        Assert.Equal(["ram0"], Directory.GetFileSystemEntries(dir.Path).Select(Path.GetFileName));
    }

    [Fact]
    public void Pages_the_stream_does_not_carry_end_up_zero_in_an_existing_file()
    {
        // Block a has four pages; the stream carries page 1 (data) and page 2 (zero) only.
        var random = new Random(5);
        byte[] p1 = StreamBuilder.RandomPage(random);
        byte[] stream = new StreamBuilder()
            .Header().Configuration("none")
            .Start(2).BlockList(("a", 4 * 4096)).EndOfRecords().Footer(2)
            .Part(2).PageRecord(0x1000, p1, "a").ZeroRecord(0x2000).EndOfRecords().Footer(2)
            .End(2).EndOfRecords().Footer(2)
            .Tail()
            .ToArray();
        using var dir = new TempDir();
        string existing = dir.File("existing"), fresh = dir.File("fresh");
        FillFile(existing, 4 * 4096, 0xff);
        using (var sink = new RamFileSink(Ram(("a", existing))) { WriteInPlace = true })
            ReadBytes(stream, r => MigrationStream.Read(r, sink));
        using (var sink = new RamFileSink(Ram(("a", fresh))))
            ReadBytes(stream, r => MigrationStream.Read(r, sink));

        byte[] expected = [.. new byte[4096], .. p1, .. new byte[8192]];
        Assert.Equal(expected, File.ReadAllBytes(existing));
        Assert.Equal(expected, File.ReadAllBytes(fresh));
    }

    [Fact]
    public void Pages_not_carried_are_zeroed_across_1_gib_bookkeeping_chunks_of_a_large_block()
    {
        // A 3 GiB block (a sparse existing file) with one page carried in the second GiB: the other pages,
        // in chunks the stream touches and in chunks it never touches, must read back as zero.
        const long length = 3L << 30, gib = 1L << 30;
        var random = new Random(6);
        byte[] page = StreamBuilder.RandomPage(random);
        byte[] stream = new StreamBuilder()
            .Header().Configuration("none")
            .Start(2).BlockList(("a", length)).EndOfRecords().Footer(2)
            .Part(2).PageRecord(gib + 4096, page, "a").EndOfRecords().Footer(2)
            .End(2).EndOfRecords().Footer(2)
            .Tail()
            .ToArray();
        using var dir = new TempDir();
        string target = dir.File("big");
        long[] marked = [0, gib - 4096, gib, 2 * gib - 4096, 2 * gib, length - 4096];
        using (var f = new FileStream(target, FileMode.Create, FileAccess.Write))
        {
            f.SetLength(length);
            foreach (long at in marked)
            {
                f.Position = at;
                f.Write(StreamBuilder.PageOf(0xff));
            }
        }
        using (var sink = new RamFileSink(Ram(("a", target))) { WriteInPlace = true })
            ReadBytes(stream, r => MigrationStream.Read(r, sink));

        Assert.Equal(length, new FileInfo(target).Length);
        using var back = File.OpenRead(target);
        byte[] read = new byte[4096];
        foreach (long at in marked)
        {
            back.Position = at;
            back.ReadExactly(read);
            Assert.True(read.All(b => b == 0), $"page at {at} was not zeroed");
        }
        back.Position = gib + 4096;
        back.ReadExactly(read);
        Assert.Equal(page, read);
    }

    [QemuFact]
    public void By_default_an_existing_file_is_replaced_by_a_new_one_and_a_failed_stream_leaves_it_as_it_was()
    {
        VersionStreams q = qemu.ForCurrent();
        using var dir = new TempDir();
        string target = dir.File("ram0");
        FillFile(target, QemuStreams.RamBytes, 0x3c);
        string before = GuestRam.Hash(target);
        byte[] bytes = File.ReadAllBytes(q.NoneStream);
        using (var sink = new RamFileSink(Ram(("ram0", target))))
            Assert.Throws<MigrationStreamException>(() => ReadBytes(bytes[..(bytes.Length - 100)], r => MigrationStream.Read(r, sink)));
        Assert.Equal(before, GuestRam.Hash(target));

        using (var sink = new RamFileSink(Ram(("ram0", target))))
            ReadBytes(bytes, r => MigrationStream.Read(r, sink));
        Assert.Equal(GuestRam.Hash(q.NoneRam), GuestRam.Hash(target));
        Assert.Equal(["ram0"], Directory.GetFileSystemEntries(dir.Path).Select(Path.GetFileName));
    }

    [QemuFact]
    public void A_failed_stream_leaves_no_scratch_file_beside_an_existing_file_written_in_place()
    {
        VersionStreams q = qemu.ForCurrent();
        using var dir = new TempDir();
        string target = dir.File("ram0");
        FillFile(target, QemuStreams.RamBytes, 0x3c);
        byte[] bytes = File.ReadAllBytes(q.NoneStream);
        using (var sink = new RamFileSink(Ram(("ram0", target))) { WriteInPlace = true })
            Assert.Throws<MigrationStreamException>(() => ReadBytes(bytes[..(bytes.Length - 100)], r => MigrationStream.Read(r, sink)));
        Assert.Equal(QemuStreams.RamBytes, new FileInfo(target).Length);
        Assert.Equal(["ram0"], Directory.GetFileSystemEntries(dir.Path).Select(Path.GetFileName));
    }

    [Fact]
    public void Later_copies_of_a_page_win_and_zero_records_clear_earlier_data_across_many_queued_batches()
    {
        // 24 MiB of pages (more batches than the sink's writer queue holds), then QEMU-style re-sends: a
        // new copy of every third page and a zero record for every fifth one, in a later part. Loaded
        // into an existing file full of other bytes and into a new file, both must be the last copies.
        const int pages = 6144;
        var random = new Random(11);
        byte[] expected = new byte[pages * 4096L];
        var builder = new StreamBuilder()
            .Header().Configuration("none")
            .Start(2).BlockList(("a", expected.Length)).EndOfRecords().Footer(2)
            .Part(2);
        for (int p = 0; p < pages; p++)
        {
            byte[] page = StreamBuilder.RandomPage(random);
            page.CopyTo(expected, p * 4096L);
            builder.PageRecord(p * 4096L, page, p == 0 ? "a" : null);
        }
        builder.EndOfRecords().Footer(2).Part(2);
        for (int p = 0; p < pages; p++)
        {
            if (p % 5 == 0)
            {
                builder.ZeroRecord(p * 4096L, p == 0 ? "a" : null);
                expected.AsSpan((int)(p * 4096L), 4096).Clear();
            }
            else if (p % 3 == 0)
            {
                byte[] page = StreamBuilder.RandomPage(random);
                page.CopyTo(expected, p * 4096L);
                builder.PageRecord(p * 4096L, page);
            }
        }
        byte[] stream = builder.EndOfRecords().Footer(2).End(2).EndOfRecords().Footer(2).Tail().ToArray();

        using var dir = new TempDir();
        string existing = dir.File("existing"), fresh = dir.File("fresh");
        FillFile(existing, expected.Length, 0x77);
        using (var sink = new RamFileSink(Ram(("a", existing))) { WriteInPlace = true })
            ReadBytes(stream, r => MigrationStream.Read(r, sink));
        using (var sink = new RamFileSink(Ram(("a", fresh))))
            ReadBytes(stream, r => MigrationStream.Read(r, sink));

        Assert.True(expected.AsSpan().SequenceEqual(File.ReadAllBytes(existing)), "the existing file differs from the last copies of the pages");
        Assert.True(expected.AsSpan().SequenceEqual(File.ReadAllBytes(fresh)), "the new file differs from the last copies of the pages");
    }

    private static void FillFile(string path, long length, byte value)
    {
        byte[] chunk = new byte[1 << 20];
        chunk.AsSpan().Fill(value);
        using var file = new FileStream(path, FileMode.Create, FileAccess.Write);
        for (long done = 0; done < length; done += chunk.Length) file.Write(chunk, 0, (int)Math.Min(chunk.Length, length - done));
    }
}
