using Vmsnap.Qcow2;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Qcow2.Snapshots;

/// <summary>
/// A snapshot create shares the active L2 tables with the new snapshot and clears their COPIED
/// flags in place, as QEMU does: the file grows by a few clusters of metadata per snapshot, however
/// many tables were written since the previous one (a copy of each would grow it by that many).
/// </summary>
[Trait("Category", "Unit")]
public sealed class SnapshotGrowthTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    [QemuTheory]
    [InlineData(1)]
    [InlineData(64)]
    public void The_file_grows_by_the_same_few_clusters_per_snapshot_whatever_was_written_since_the_last(int tablesWritten)
    {
        // 4 KiB clusters: 2 MiB per L2 table, 64 tables for a 128 MiB disk.
        string image = _dir.File($"grow-{tablesWritten}.qcow2");
        Qemu.Create(image, 128 << 20, "cluster_size=4k");
        var writes = Enumerable.Range(0, 64).Select(t => $"write -P 0x{t + 1:x} {t * 2}M 4k").ToArray();
        Qemu.Io(image, writes);
        Tool.QemuImg("snapshot", "-c", "first", image);
        Qemu.Io(image, Enumerable.Range(0, tablesWritten).Select(t => $"write -P 0x{t + 0x81:x} {t * 2}M 4k").ToArray());
        string byQemu = _dir.File($"grow-qemu-{tablesWritten}.qcow2");
        File.Copy(image, byQemu);
        byte[] active = SnapshotKit.QemuActiveContent(image, _dir);

        long before = new FileInfo(image).Length;
        using (var img = Qcow2Image.Open(image)) img.CreateSnapshot("second");
        long growth = new FileInfo(image).Length - before;
        long qemuBefore = new FileInfo(byQemu).Length;
        Tool.QemuImg("snapshot", "-c", "second", byQemu);
        long qemuGrowth = new FileInfo(byQemu).Length - qemuBefore;

        QemuImgCheck.AssertClean(image);
        SnapshotKit.AssertEqualBytes(active, SnapshotKit.QemuSnapshotContent(image, "second", _dir), "the new snapshot");
        SnapshotKit.AssertEqualBytes(active, SnapshotKit.QemuActiveContent(image, _dir), "the active disk");
        // The snapshot's L1 table, the active L1 table, refcount blocks and table, snapshot table: a handful of clusters.
        Assert.True(growth <= 8 * 4096, $"the file grew by {growth} bytes for {tablesWritten} L2 tables written since the last snapshot (qemu-img: {qemuGrowth})");

        // And the tables are the active disk's and the snapshot's at once: a write now copies the table, the snapshot keeps its bytes.
        using (var img = Qcow2Image.Open(image)) img.Write([0xee], 0);
        QemuImgCheck.AssertClean(image);
        SnapshotKit.AssertEqualBytes(active, SnapshotKit.QemuSnapshotContent(image, "second", _dir), "the new snapshot after a write");
    }
}
