using System.Buffers.Binary;
using Vmsnap.Qcow2;
using Vmsnap.Storage;
using Vmsnap.Tests.Interop;
using Vmsnap.Tests.Qcow2.Snapshots;

namespace Vmsnap.Tests.Qcow2;

/// <summary>
/// Crash safety when the metadata caches evict dirty tables between operations: a table written
/// back by an eviction is on the disk only after a flush, so whatever depends on it (an L1 entry
/// pointing to an evicted L2 table, an L2 entry relying on an evicted refcount block) must wait for
/// that flush even when nothing else is dirty by then.
/// </summary>
[Trait("Category", "Unit")]
public sealed class CacheEvictionCrashTests : IDisposable
{
    private const int ClusterSize = 4096;
    private const long BytesPerL2 = (long)ClusterSize * (ClusterSize / 8);   // 2 MiB
    private const int Populated = 6;
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    /// <summary>
    /// An image whose first <see cref="Populated"/> L2 ranges hold one data cluster each, plus a freed
    /// cluster (the first free one) still holding bytes that read as L2 entries pointing, with COPIED
    /// set, to guest cluster 0's host cluster: an L2 table allocated there and lost in a crash would
    /// make that cluster referenced twice with refcount 1.
    /// </summary>
    private static byte[] Template()
    {
        var device = new MemoryBlockDevice();
        using (var img = Qcow2Image.Create(device, "template", 64 << 20, new Qcow2CreateOptions { ClusterSize = ClusterSize }))
        {
            for (int i = 0; i < Populated; i++) img.Write(Fill(ClusterSize, 0x11), i * BytesPerL2);
            img.Flush();
            var extents = new List<Qcow2Engine.Extent>();
            lock (img.Engine.SyncRoot) img.Engine.Mapping.MapRange(img.Engine.State.ActiveL1, 0, ClusterSize, extents);
            long host0 = Assert.Single(extents).Host;
            byte[] fake = new byte[ClusterSize];
            for (int j = 0; j < ClusterSize / 8; j++) BinaryPrimitives.WriteUInt64BigEndian(fake.AsSpan(j * 8), (ulong)host0 | L2Entry.Copied);
            img.Write(fake, 20 << 20);
            img.Flush();
            img.Discard(20 << 20, ClusterSize);
            img.Flush();
        }
        return device.ToArray();
    }

    private static byte[] Fill(int length, byte value)
    {
        byte[] b = new byte[length];
        b.AsSpan().Fill(value);
        return b;
    }

    /// <summary>A write that needs a new L2 table, reads that push it out of a small cache, then a flush.</summary>
    private static void Run(Qcow2Image img)
    {
        img.Engine.State.L2Cache.Capacity = 4;
        img.Write([0x22], 40 << 20);
        byte[] one = new byte[1];
        for (int i = 0; i < Populated; i++) img.Read(one, i * BytesPerL2);
        img.Flush();
    }

    [QemuFact]
    public void A_crash_after_an_L2_table_was_evicted_never_leaves_an_L1_entry_pointing_to_a_lost_table()
    {
        byte[] template = Template();
        var dry = new CrashDevice(template);
        using (var img = Qcow2Image.Open(dry, "dry")) Run(img);
        int total = dry.Operations;
        Assert.InRange(total, 3, 200);
        string copy = _dir.File("crashed.qcow2");
        for (int k = 0; k < total; k++)
        {
            var device = new CrashDevice(template) { CrashAt = k };
            Assert.Throws<StorageException>(() =>
            {
                using var img = Qcow2Image.Open(device, copy);
                Run(img);
            });
            int pending = device.PendingCount;
            Assert.InRange(pending, 0, 8);
            for (int mask = 0; mask < 1 << pending; mask++)
            {
                int m = mask;
                File.WriteAllBytes(copy, device.AfterCrash(i => (m >> i & 1) != 0));
                (var json, int exit) = QemuImgCheck.Of(copy);
                Assert.True(QemuImgCheck.Field(json, "corruptions") == 0 && QemuImgCheck.Field(json, "check-errors") == 0,
                    $"crash at operation {k} of {total}, unflushed writes kept: mask {m:b} of {pending}: qemu-img check exit {exit}, {json}");
                string raw = Qemu.ToRaw(copy, _dir);
                for (int i = 0; i < Populated; i++) Assert.All(Qemu.ReadRaw(raw, i * BytesPerL2, ClusterSize), b => Assert.Equal(0x11, b));
            }
        }
    }
}
