using Vmsnap.Qcow2;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Qcow2.Snapshots;

/// <summary>
/// Seeded random sequences of writes, zeroes, discards, saves (VM state + snapshot) and snapshot
/// create/delete/apply (mostly by vmsnap, some by qemu-img on the same image), against a model of
/// the disk and of every snapshot: after every few steps qemu-img check finds no error and no leak,
/// each snapshot's disk (qemu-img convert -l) is the disk at its creation, the active disk is the
/// model's, and each snapshot's VM state reads back as written.
/// </summary>
[Trait("Category", "Unit")]
public class SnapshotPropertyTests
{
    public static TheoryData<string, int> Cases()
    {
        var data = new TheoryData<string, int>();
        foreach (string config in new[] { "v3-64k", "v2-512", "extl2-16k", "v3-4k-rc4", "v3-2m" })
            foreach (int seed in new[] { 1, 2 })
                data.Add(config, seed);
        return data;
    }

    private sealed class Model
    {
        public required byte[] Disk;
        public readonly List<(string Name, byte[] Disk, byte[]? State)> Snapshots = [];
    }

    [QemuTheory]
    [MemberData(nameof(Cases))]
    public void Random_snapshot_sequences_keep_the_image_consistent_and_every_snapshot_exact(string config, int seed)
    {
        var random = new Random(seed * 7919 + config.Length);
        OptionSet o = config == "v3-4k-rc4"
            ? new OptionSet("v3-4k-rc4", "cluster_size=4k,refcount_bits=4", new Qcow2CreateOptions { ClusterSize = 4096, RefcountBits = 4 }, 0)
            : Qemu.Set(config);
        long size = o.ClusterSize switch { 512 => 1 << 20, >= 1 << 21 => 16 << 20, _ => 4 << 20 };
        int cs = o.ClusterSize;
        using var dir = new TempDir();
        string image = dir.File("p.qcow2");
        Qemu.Create(image, size, o.QemuOptions);
        var model = new Model { Disk = new byte[size] };
        int names = 0;
        Qcow2Image? img = null;
        Qcow2Image Open() => img ??= Qcow2Image.Open(image);
        void Close()
        {
            img?.Dispose();
            img = null;
        }

        const int Steps = 36;
        for (int step = 0; step < Steps; step++)
        {
            int op = random.Next(100);
            string what;
            if (op < 35)
            {
                int length = random.Next(10) switch { 0 => 1, 1 => cs, < 5 => random.Next(1, 3 * cs), _ => random.Next(1, (int)Math.Min(size / 4, 300_000)) };
                long offset = random.Next(3) == 0 ? random.NextInt64(0, size / cs) * cs : random.NextInt64(0, size - length);
                offset = Math.Min(offset, size - length);
                byte[] data = new byte[length];
                random.NextBytes(data);
                Open().Write(data, offset);
                data.CopyTo(model.Disk, offset);
                what = $"write {length}@{offset}";
            }
            else if (op < 42)
            {
                long offset = random.NextInt64(0, size / cs) * cs, length = Math.Min(size - offset, cs * random.Next(1, 4));
                if (random.Next(2) == 0) Open().WriteZeroes(offset, length);
                else Open().Discard(offset, length);
                Array.Clear(model.Disk, (int)offset, (int)length);
                what = $"zero {length}@{offset}";
            }
            else if (op < 62 && model.Snapshots.Count < 6)
            {
                string name = $"s{++names}";
                byte[]? state = null;
                bool byQemu = random.Next(5) == 0;
                if (byQemu)
                {
                    Close();
                    Tool.QemuImg("snapshot", "-c", name, image);
                }
                else if (random.Next(3) == 0)
                {
                    state = new byte[random.Next(1, 3 * cs + 70_000)];
                    random.NextBytes(state);
                    using Qcow2VmStateArea area = Open().OpenVmStateAreaForWriting();
                    area.Write(state, 0);
                    area.Flush();
                    Open().CreateSnapshot(name, new Qcow2SnapshotCreateOptions { VmStateSize = state.Length });
                }
                else
                {
                    Open().CreateSnapshot(name);
                }
                model.Snapshots.Add((name, (byte[])model.Disk.Clone(), state));
                what = $"create {name}{(state is null ? "" : $" with {state.Length} bytes of VM state")}{(byQemu ? " (qemu-img)" : "")}";
            }
            else if (op < 80 && model.Snapshots.Count > 0)
            {
                var victim = model.Snapshots[random.Next(model.Snapshots.Count)];
                bool byQemu = random.Next(5) == 0;
                if (byQemu)
                {
                    Close();
                    Tool.QemuImg("snapshot", "-d", victim.Name, image);
                }
                else
                {
                    Open().DeleteSnapshot(victim.Name);
                }
                model.Snapshots.Remove(victim);
                what = $"delete {victim.Name}{(byQemu ? " (qemu-img)" : "")}";
            }
            else if (model.Snapshots.Count > 0)
            {
                var target = model.Snapshots[random.Next(model.Snapshots.Count)];
                bool byQemu = random.Next(5) == 0;
                if (byQemu)
                {
                    Close();
                    Tool.QemuImg("snapshot", "-a", target.Name, image);
                }
                else
                {
                    Open().ApplySnapshot(target.Name);
                }
                model.Disk = (byte[])target.Disk.Clone();
                what = $"apply {target.Name}{(byQemu ? " (qemu-img)" : "")}";
            }
            else
            {
                continue;
            }

            if (step % 4 == 3 || step == Steps - 1)
            {
                Close();
                string where = $"{config} seed {seed} after step {step} ({what})";
                (long corruptions, long leaks, long errors, _, string text) = QemuImgCheck.Of(image);
                Assert.True(corruptions == 0 && leaks == 0 && errors == 0, $"{where}: {text}");
                Assert.Equal(model.Snapshots.Select(s => s.Name), SnapshotKit.QemuList(image).Select(r => r.Tag));
                if (step % 8 == 7 || step == Steps - 1)
                {
                    SnapshotKit.AssertEqualBytes(model.Disk, SnapshotKit.QemuActiveContent(image, dir), $"{where}: active disk");
                    foreach (var s in model.Snapshots)
                        SnapshotKit.AssertEqualBytes(s.Disk, SnapshotKit.QemuSnapshotContent(image, s.Name, dir), $"{where}: snapshot {s.Name}");
                    using var check = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true });
                    foreach (var s in model.Snapshots.Where(s => s.State is not null))
                    {
                        using Qcow2VmStateArea area = check.OpenVmStateAreaForReading(s.Name);
                        byte[] back = new byte[area.Length];
                        area.Read(back, 0);
                        SnapshotKit.AssertEqualBytes(s.State!, back, $"{where}: VM state of {s.Name}");
                    }
                }
            }
        }
        Close();
    }
}
