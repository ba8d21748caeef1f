using Vmsnap.Qcow2;
using Vmsnap.Storage;
using Vmsnap.Tests.Interop;
using Vmsnap.VmState;

namespace Vmsnap.Tests.Qcow2.Snapshots;

/// <summary>The VM-state area: what is written reads back through the snapshot, nothing leaks, metadata goes out in batches.</summary>
[Trait("Category", "Unit")]
public class VmStateAreaTests
{
    private static byte[] Random(int length, int seed)
    {
        byte[] b = new byte[length];
        new Random(seed).NextBytes(b);
        return b;
    }

    /// <summary>Writes <paramref name="data"/> through the buffered VM-state writer (K x B) into a new area, flushes it, returns the area.</summary>
    private static Qcow2VmStateArea Save(Qcow2Image image, byte[] data, int count = 4, int size = 1 << 20)
    {
        Qcow2VmStateArea area = image.OpenVmStateAreaForWriting();
        using (var backend = VmStateBackend.ForBlockDevice(area))
        using (var writer = new VmStateWriter(backend, new VmStateWriterOptions { BufferCount = count, BufferSize = size }))
        {
            for (int at = 0; at < data.Length; at += 100_003)
                writer.PutBuffer(data.AsSpan(at, Math.Min(100_003, data.Length - at)));
            writer.Close();
        }
        area.Flush();
        return area;
    }

    private static byte[] ReadVmState(Qcow2Image image, string name)
    {
        using Qcow2VmStateArea area = image.OpenVmStateAreaForReading(name);
        byte[] bytes = new byte[area.Length];
        Assert.Equal(bytes.Length, area.Read(bytes, 0));
        Assert.Equal(0, area.Read(new byte[1], area.Length));
        return bytes;
    }

    /// <summary>Host clusters a snapshot's VM state occupies.</summary>
    private static HashSet<long> HostClusters(Qcow2Image image, Qcow2Snapshot s)
    {
        Qcow2Engine e = image.Engine;
        L1Table l1 = e.Mapping.ReadL1Table(s.L1TableOffset, (uint)s.L1Size, "test");
        var extents = new List<Qcow2Engine.Extent>();
        lock (e.SyncRoot) e.Mapping.MapRange(l1, e.VmStateOffsetFor(s.DiskSize), s.VmStateSize, extents);
        var clusters = new HashSet<long>();
        foreach (Qcow2Engine.Extent x in extents.Where(x => x.Kind == Qcow2Engine.ExtentKind.Data))
            for (long h = x.Host >> e.State.Geometry.ClusterBits; h <= (x.Host + x.Length - 1) >> e.State.Geometry.ClusterBits; h++) clusters.Add(h);
        return clusters;
    }

    [QemuTheory]
    [InlineData("v3-64k")]
    [InlineData("v2-512")]
    [InlineData("extl2-16k")]
    [InlineData("v3-2m")]
    [InlineData("v3-4k-rc2")]
    public void Vm_state_written_reads_back_through_each_snapshot_and_deleting_frees_it(string name)
    {
        OptionSet o = Qemu.Set(name);
        using var dir = new TempDir();
        string image = dir.File("a.qcow2");
        long size = o.ClusterSize >= 1 << 20 ? 64L << 20 : 16L << 20;
        Qemu.Create(image, size, o.QemuOptions);
        Qemu.Io(image, $"write -P 0x17 0 {3 * o.ClusterSize}");
        byte[] first = Random((5 << 20) + 123, 1), second = Random((3 << 20) + 7, 2);
        using (var img = Qcow2Image.Open(image))
        {
            using (Qcow2VmStateArea area = Save(img, first))
            {
                Assert.Equal(first.Length, area.Length);
                Assert.Equal(img.Engine.VmStateOffset, area.GuestOffset);
                img.CreateSnapshot("one", new Qcow2SnapshotCreateOptions { VmStateSize = first.Length });
            }
            img.Write(Random(5000, 3), 100);
            using (Save(img, second, count: 16, size: 64 << 10))
                img.CreateSnapshot("two", new Qcow2SnapshotCreateOptions { VmStateSize = second.Length });
            // The second save wrote fresh clusters: nothing of the first snapshot's VM state was shared or copied.
            Assert.Empty(HostClusters(img, img.FindSnapshot("one")!).Intersect(HostClusters(img, img.FindSnapshot("two")!)));
        }
        QemuImgCheck.AssertClean(image);
        Assert.Equal([(long)first.Length, second.Length], SnapshotKit.QemuInfo(image).Select(s => s.VmStateSize));
        using (var img = Qcow2Image.Open(image))
        {
            Assert.True(first.AsSpan().SequenceEqual(ReadVmState(img, "one")));
            Assert.True(second.AsSpan().SequenceEqual(ReadVmState(img, "two")));
            img.DeleteSnapshot("one");
            Assert.True(second.AsSpan().SequenceEqual(ReadVmState(img, "two")));
        }
        QemuImgCheck.AssertClean(image);
        using (var img = Qcow2Image.Open(image)) img.DeleteSnapshot("two");
        QemuImgCheck.AssertClean(image);
    }

    [QemuFact]
    public void Discarding_a_failed_save_frees_everything_and_trims_the_file()
    {
        using var dir = new TempDir();
        string image = dir.File("d.qcow2");
        Qemu.Create(image, 16 << 20);
        Qemu.Io(image, "write -P 0x21 0 1M");
        Tool.QemuImg("snapshot", "-c", "keep", image);
        long before = new FileInfo(image).Length;
        using (var img = Qcow2Image.Open(image))
        {
            using Qcow2VmStateArea area = Save(img, Random(9 << 20, 4));
            Assert.True(new FileInfo(image).Length > before + (8 << 20));
            area.Discard(0, area.Length);
            Assert.Equal(0, area.Length);
            Assert.Equal(0UL, img.Engine.State.ActiveL1[img.Engine.State.Geometry.L1EntriesFor(img.VirtualSize)]);   // its L2 table went too
        }
        QemuImgCheck.AssertClean(image);
        Assert.InRange(new FileInfo(image).Length, 0, before + 4 * 65536);
        Assert.Equal(["keep"], SnapshotKit.QemuList(image).Select(r => r.Tag));
    }

    [QemuFact]
    public void Bytes_of_a_reused_cluster_that_no_write_covered_read_as_zero()
    {
        using var dir = new TempDir();
        string image = dir.File("z.qcow2");
        Qemu.Create(image, 16 << 20);
        int cs = 65536;
        var garbage = new HashSet<long>();
        using (var img = Qcow2Image.Open(image))
        {
            img.Write(Enumerable.Repeat((byte)0xee, 8 * cs).ToArray(), 0);
            img.Flush();
            var extents = new List<Qcow2Engine.Extent>();
            lock (img.Engine.SyncRoot) img.Engine.Mapping.MapRange(img.Engine.State.ActiveL1, 0, 8 * cs, extents);
            foreach (var x in extents) for (long h = x.Host / cs; h < (x.Host + x.Length) / cs; h++) garbage.Add(h);
            img.Discard(0, 8 * cs);   // freed; the file still holds 0xee there
            img.Flush();

            using (Qcow2VmStateArea area = img.OpenVmStateAreaForWriting())
            {
                area.Write(Enumerable.Repeat((byte)1, 100).ToArray(), 0);
                area.Write(Enumerable.Repeat((byte)2, 50).ToArray(), 3L * cs + 5);
                area.Flush();
                img.CreateSnapshot("z", new Qcow2SnapshotCreateOptions { VmStateSize = 4L * cs });
            }
            Qcow2Snapshot s = img.FindSnapshot("z")!;
            Assert.NotEmpty(HostClusters(img, s).Intersect(garbage));   // the area did reuse clusters holding old bytes
            byte[] back = ReadVmState(img, "z");
            byte[] expected = new byte[4 * cs];
            expected.AsSpan(0, 100).Fill(1);
            expected.AsSpan(3 * cs + 5, 50).Fill(2);
            SnapshotKit.AssertEqualBytes(expected, back, "VM state with gaps");
        }
        QemuImgCheck.AssertClean(image);
    }

    [QemuFact]
    public void Metadata_is_written_in_batches_not_per_write()
    {
        using var dir = new TempDir();
        string image = dir.File("b.qcow2");
        Qemu.Create(image, 16 << 20);
        var device = new CountingDevice(FileBlockDevice.Open(image, new FileBlockDeviceOptions { Writable = true }));
        byte[] data = Random(64 << 20, 5);
        using (var img = Qcow2Image.Open(device, image))
        {
            img.Write(new byte[512], 0);   // the first write's consistency check, outside the counts
            img.Flush();
            int writesBefore = device.Writes, smallBefore = device.SmallWrites;
            using Qcow2VmStateArea area = img.OpenVmStateAreaForWriting();
            using (var backend = VmStateBackend.ForBlockDevice(area))
            using (var writer = new VmStateWriter(backend, new VmStateWriterOptions { BufferCount = 8, BufferSize = 1 << 20 }))
            {
                writer.PutBuffer(data);
                writer.Close();
            }
            int dataWrites = device.Writes - writesBefore, smallWhileWriting = device.SmallWrites - smallBefore;
            area.Flush();
            int smallTotal = device.SmallWrites - smallBefore;
            // 1024 clusters were mapped: one metadata write per write (or per cluster) would be 64 (or
            // 1024) small writes. The area writes none until the snapshot takes it over, which then
            // writes a handful in one batch (the area's L2 table, two L1 tables, refcounts, the snapshot table, the header).
            Assert.InRange(dataWrites, 64, 64 + 10);
            Assert.True(smallTotal == 0, $"{smallTotal} small writes before the snapshot: {string.Join(", ", device.SmallLog)}");
            Assert.Equal(0, smallWhileWriting);
            img.CreateSnapshot("b", new Qcow2SnapshotCreateOptions { VmStateSize = data.Length });
            int smallCreate = device.SmallWrites - smallBefore;
            Assert.True(smallCreate is >= 4 and <= 16, $"{smallCreate} small writes for the snapshot: {string.Join(", ", device.SmallLog)}");
            Assert.True(data.AsSpan().SequenceEqual(ReadVmState(img, "b")));
        }
        QemuImgCheck.AssertClean(image);
    }

    [QemuFact]
    public async Task Writes_completing_in_any_order_land_where_they_belong()
    {
        using var dir = new TempDir();
        string image = dir.File("o.qcow2");
        Qemu.Create(image, 16 << 20, "cluster_size=4k");
        byte[] data = Random(40 * 65536, 6);
        using (var img = Qcow2Image.Open(image, new Qcow2OpenOptions { Direct = true }))
        {
            using (Qcow2VmStateArea area = img.OpenVmStateAreaForWriting())
            {
                // Issued back to front, all in flight at once, from aligned memory.
                var buffers = new List<AlignedBuffer>();
                var writes = new List<Task>();
                for (int i = 39; i >= 0; i--)
                {
                    var b = new AlignedBuffer(65536);
                    data.AsSpan(i * 65536, 65536).CopyTo(b.GetSpan());
                    buffers.Add(b);
                    writes.Add(area.WriteAsync(b.Memory, i * 65536L).AsTask());
                }
                await Task.WhenAll(writes);
                buffers.ForEach(b => b.Dispose());
                area.Flush();
                img.CreateSnapshot("o", new Qcow2SnapshotCreateOptions { VmStateSize = data.Length });
            }
            Assert.True(data.AsSpan().SequenceEqual(ReadVmState(img, "o")));
        }
        QemuImgCheck.AssertClean(image);
    }

    [QemuFact]
    public void The_area_belongs_to_one_writer_and_snapshots_in_use_are_protected()
    {
        using var dir = new TempDir();
        string image = dir.File("r.qcow2");
        Qemu.Create(image, 16 << 20);
        using var img = Qcow2Image.Open(image);
        using (Qcow2VmStateArea area = Save(img, Random(100_000, 7)))
        {
            Assert.Throws<OperationRefusedException>(() => img.OpenVmStateAreaForWriting());
            img.CreateSnapshot("plain");
            Assert.Contains("VM-state area", Assert.Throws<OperationRefusedException>(() => img.ApplySnapshot("plain")).Message);
            img.CreateSnapshot("with-state", new Qcow2SnapshotCreateOptions { VmStateSize = 100_000 });
            Assert.Contains("taken over", Assert.Throws<OperationRefusedException>(() => area.Write(new byte[10], 0)).Message);
        }
        using (Qcow2VmStateArea reading = img.OpenVmStateAreaForReading("with-state"))
        {
            Assert.Throws<StorageException>(() => reading.Write(new byte[10], 0));
            Assert.Contains("reading", Assert.Throws<OperationRefusedException>(() => img.DeleteSnapshot("with-state")).Message);
            img.ApplySnapshot("plain");   // other snapshots may change meanwhile
        }
        img.DeleteSnapshot("with-state");
        Assert.Throws<SnapshotNotFoundException>(() => img.OpenVmStateAreaForReading("with-state"));
    }

    [QemuFact]
    public void What_an_abandoned_save_or_a_qemu_apply_left_in_the_active_table_is_dropped_by_the_next_save()
    {
        using var dir = new TempDir();
        string image = dir.File("l.qcow2");
        Qemu.Create(image, 16 << 20);
        byte[] kept = Random(2 << 20, 8);
        using (var img = Qcow2Image.Open(image))
        {
            using (Save(img, kept)) img.CreateSnapshot("kept", new Qcow2SnapshotCreateOptions { VmStateSize = kept.Length });
            using (Save(img, Random(3 << 20, 9))) { }   // abandoned: still mapped by the active table
        }
        QemuImgCheck.AssertClean(image);
        // QEMU's apply copies the snapshot's whole L1 table, VM-state area included, into the active one.
        Tool.QemuImg("snapshot", "-a", "kept", image);
        QemuImgCheck.AssertClean(image);
        byte[] next = Random(1 << 20, 10);
        using (var img = Qcow2Image.Open(image))
        {
            using (Save(img, next)) img.CreateSnapshot("next", new Qcow2SnapshotCreateOptions { VmStateSize = next.Length });
            Assert.True(kept.AsSpan().SequenceEqual(ReadVmState(img, "kept")));
            Assert.True(next.AsSpan().SequenceEqual(ReadVmState(img, "next")));
        }
        QemuImgCheck.AssertClean(image);
    }

    [QemuFact]
    public void A_snapshot_create_that_fails_leaves_the_area_to_its_writer()
    {
        using var dir = new TempDir();
        string image = dir.File("f.qcow2");
        Qemu.Create(image, 16 << 20);
        var device = new CountingDevice(FileBlockDevice.Open(image, new FileBlockDeviceOptions { Writable = true }));
        byte[] data = Random(1 << 20, 11);
        using (var img = Qcow2Image.Open(device, image))
        {
            using Qcow2VmStateArea area = Save(img, data);
            device.FailAt = device.Writes;   // the create's first write
            Assert.Throws<Vmsnap.Storage.StorageException>(() => img.CreateSnapshot("s", new Qcow2SnapshotCreateOptions { VmStateSize = data.Length }));
            Assert.Empty(img.Snapshots);
            area.Write(data.AsSpan(0, 10), data.Length);   // still the writer's: the save can go on...
            area.Discard(0, area.Length);                   // ...or be given up without a trace
        }
        device.Dispose();
        QemuImgCheck.AssertClean(image);
    }

    [QemuFact]
    public void Closing_the_image_with_the_area_still_open_leaks_nothing()
    {
        using var dir = new TempDir();
        string image = dir.File("c.qcow2");
        Qemu.Create(image, 16 << 20);
        var img = Qcow2Image.Open(image);
        Qcow2VmStateArea area = img.OpenVmStateAreaForWriting();
        area.Write(Random(100_000, 12), 0);   // a reservation of several MiB, little of it used
        img.Dispose();
        area.Dispose();
        QemuImgCheck.AssertClean(image);
    }
}
