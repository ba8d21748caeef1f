using Vmsnap.Qcow2;
using Vmsnap.Storage;
using Vmsnap.Tests.Interop;
using Vmsnap.Tests.Qcow2.Snapshots;

namespace Vmsnap.Tests.Qcow2;

/// <summary>
/// Crash safety of copy-on-write for the data, not only the metadata: a partial write into a
/// cluster shared with a snapshot (or read from a backing file) writes a merged copy to a new
/// cluster, then links it. The merged copy holds bytes the guest wrote and flushed long ago; the L2
/// entry pointing to it must not reach the disk before it, whatever else flushes the metadata
/// meanwhile (another thread's Flush, a cache eviction). After a crash at any device operation,
/// with any subset of the unflushed writes kept, those old bytes must read back.
/// </summary>
[Trait("Category", "Unit")]
public sealed class CowCrashTests : IDisposable
{
    private const int ClusterSize = 4096;
    private const long BytesPerL2 = (long)ClusterSize * (ClusterSize / 8);   // 2 MiB
    private const int Others = 6;                                           // other L2 ranges holding data
    private const long DiskSize = 16 << 20;
    private const int WriteAt = 1000, WriteLength = 100;
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    /// <summary>Cluster 0 holds 0x11 and each of <see cref="Others"/> L2 ranges one cluster of 0x20 + i; then a snapshot, or the data lives in a backing file.</summary>
    private (string Image, string? Backing) Template(bool backing)
    {
        string image = _dir.File(backing ? "overlay.qcow2" : "shared.qcow2");
        string target = image;
        string? backingFile = null;
        if (backing)
        {
            backingFile = _dir.File("base.qcow2");
            Qemu.Create(backingFile, DiskSize, "cluster_size=4k");
            target = backingFile;
        }
        else
        {
            Qemu.Create(image, DiskSize, "cluster_size=4k");
        }
        var writes = new List<string> { "write -P 0x11 0 64k" };
        for (int i = 1; i <= Others; i++) writes.Add($"write -P 0x{0x20 + i:x} {i * BytesPerL2} 4k");
        Qemu.Io(target, [.. writes]);
        if (backing) Qemu.Create(image, DiskSize, "cluster_size=4k", "base.qcow2", "qcow2");
        else Tool.QemuImg("snapshot", "-c", "s", image);
        return (image, backingFile);
    }

    /// <summary>
    /// The write of 100 bytes into cluster 0; while its merged copy is being written (outside the
    /// engine's lock), another thread flushes the image. Then reads of the other L2 ranges push the
    /// linked L2 table out of a small cache, then a flush.
    /// </summary>
    private static void Run(Qcow2Image img, CrashDevice device)
    {
        img.Engine.State.L2Cache.Capacity = 4;
        bool armed = true;
        device.BeforeWrite = (data, _) =>
        {
            if (!armed || data.Length != ClusterSize || data[0] != 0x11 || data[WriteAt] != 0x99) return;
            armed = false;
            Task.Run(img.Flush).GetAwaiter().GetResult();
        };
        img.Write(Enumerable.Repeat((byte)0x99, WriteLength).ToArray(), WriteAt);
        Assert.False(armed, "the merged copy was not seen");
        byte[] one = new byte[1];
        for (int i = 1; i <= Others; i++) img.Read(one, i * BytesPerL2);
        img.Flush();
    }

    private static Qcow2Image Open(CrashDevice device, string name, string? backing) =>
        Qcow2Image.Open(device, name, new Qcow2OpenOptions { BackingFileOverride = backing });

    [QemuTheory]
    [InlineData(false)]
    [InlineData(true)]
    public void A_crash_anywhere_in_a_copy_on_write_keeps_the_flushed_bytes_of_the_cluster(bool backing)
    {
        (string image, string? backingFile) = Template(backing);
        byte[] template = File.ReadAllBytes(image);
        byte[] snapshot = backing ? [] : SnapshotKit.QemuSnapshotContent(image, "s", _dir);
        var dry = new CrashDevice(template);
        using (var img = Open(dry, "dry", backingFile)) Run(img, dry);
        int total = dry.Operations;
        Assert.InRange(total, 4, 200);

        string copy = Path.Combine(Path.GetDirectoryName(image)!, "crashed.qcow2");   // beside the backing file
        int judgedStates = 0;
        for (int k = 0; k < total; k++)
        {
            var device = new CrashDevice(template) { CrashAt = k };
            Assert.Throws<StorageException>(() =>
            {
                using var img = Open(device, copy, backingFile);
                Run(img, device);
            });
            int pending = device.PendingCount;
            var masks = new List<Func<int, bool>>();
            if (pending <= 4)
            {
                for (int mask = 0; mask < 1 << pending; mask++)
                {
                    int m = mask;
                    masks.Add(i => (m >> i & 1) != 0);
                }
            }
            else
            {
                masks.Add(_ => false);
                masks.Add(_ => true);
                for (int r = 0; r < 6; r++)
                {
                    int seed = k * 100 + r;
                    masks.Add(i => new Random(seed + i * 7919).Next(2) == 0);
                }
            }
            var judged = new HashSet<string>();
            foreach (Func<int, bool> keep in masks)
            {
                byte[] bytes = device.AfterCrash(keep);
                if (!judged.Add(Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(bytes)))) continue;
                File.WriteAllBytes(copy, bytes);
                string what = $"crash at operation {k} of {total} ({pending} writes unflushed)";
                (long corruptions, _, long errors, _, string text) = QemuImgCheck.Of(copy);
                Assert.True(corruptions == 0 && errors == 0, $"{what}: qemu-img check: {text}");
                byte[] active = SnapshotKit.QemuActiveContent(copy, _dir);
                byte[] cluster = active.AsSpan(0, ClusterSize).ToArray();
                for (int i = 0; i < ClusterSize; i++)
                {
                    if (i >= WriteAt && i < WriteAt + WriteLength) continue;
                    Assert.True(cluster[i] == 0x11, $"{what}: byte {i} of the copied cluster is 0x{cluster[i]:x2}, not the flushed 0x11");
                }
                byte[] written = cluster.AsSpan(WriteAt, WriteLength).ToArray();
                Assert.True(written.All(b => b == 0x11) || written.All(b => b == 0x99), $"{what}: the written range is neither old nor new");
                for (int i = 1; i <= Others; i++)
                    Assert.All(active.AsSpan((int)(i * BytesPerL2), ClusterSize).ToArray(), b => Assert.Equal(0x20 + i, b));
                if (!backing) SnapshotKit.AssertEqualBytes(snapshot, SnapshotKit.QemuSnapshotContent(copy, "s", _dir), $"{what}: snapshot s");
                judgedStates++;
            }
        }
        Assert.True(judgedStates > total);
    }
}
