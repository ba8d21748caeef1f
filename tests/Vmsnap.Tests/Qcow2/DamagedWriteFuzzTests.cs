using System.Buffers.Binary;
using Vmsnap.Qcow2;

namespace Vmsnap.Tests.Qcow2;

/// <summary>
/// Changes to images whose metadata was damaged at random (one entry of one table), seeded so that
/// every run tries the same images: every operation either goes ahead, or fails with vmsnap's own
/// error leaving the image byte for byte as it was, or with only the corrupt bit set (a write that
/// would have hit metadata). Closing never throws anything else either. The parser fuzzer only reads;
/// this reaches the write paths: allocation, copy-on-write, snapshot generations, the VM-state area.
/// </summary>
[Trait("Category", "Unit")]
public sealed class DamagedWriteFuzzTests
{
    private const int ClusterSize = 4096;

    /// <summary>A 16 MiB image (4 KiB clusters) with data in several L2 ranges, a disk-only snapshot 'a', more data, and a snapshot 'b' with VM state.</summary>
    private static byte[] Template()
    {
        var device = new MemoryBlockDevice();
        using (var img = Qcow2Image.Create(device, "template", 16 << 20, new Qcow2CreateOptions { ClusterSize = ClusterSize }))
        {
            var rng = new Random(1);
            foreach (long at in new long[] { 0, 3 << 20, 9 << 20, (16 << 20) - 20000 })
            {
                byte[] data = new byte[20000];
                rng.NextBytes(data);
                img.Write(data, at);
            }
            img.CreateSnapshot("a");
            img.Write(new byte[70000], 1 << 20);
            using (Qcow2VmStateArea area = img.OpenVmStateAreaForWriting())
            {
                byte[] state = new byte[50000];
                rng.NextBytes(state);
                area.Write(state, 0);
                area.Flush();
                img.CreateSnapshot("b", new Qcow2SnapshotCreateOptions { VmStateSize = state.Length });
            }
            img.Write(new byte[] { 1, 2, 3 }, 5 << 20);
        }
        return device.ToArray();
    }

    /// <summary>The tables of the template (offset, entry size): header fields, L1 tables, L2 tables, refcount table and blocks, snapshot table.</summary>
    private static List<(long Offset, int Length, int EntrySize)> Tables(byte[] image)
    {
        var tables = new List<(long, int, int)> { (Qcow2Header.L1SizeOffset, 36, 4) };
        using var device = new MemoryBlockDevice(image);
        using var img = Qcow2Image.Open(device, "t", new Qcow2OpenOptions { ReadOnly = true });
        Qcow2Header h = img.Engine.State.Header;
        var l1s = new List<(long Offset, int Entries)> { ((long)h.L1TableOffset, (int)h.L1Size) };
        foreach (Qcow2Snapshot s in img.Snapshots) l1s.Add((s.L1TableOffset, s.L1Size));
        foreach ((long offset, int entries) in l1s)
        {
            tables.Add((offset, entries * 8, 8));
            for (int i = 0; i < entries; i++)
            {
                long l2 = (long)(BinaryPrimitives.ReadUInt64BigEndian(image.AsSpan((int)offset + i * 8)) & L1Entry.OffsetMask);
                if (l2 != 0) tables.Add((l2, ClusterSize, 8));
            }
        }
        long table = (long)h.RefcountTableOffset;
        tables.Add((table, ClusterSize, 8));
        for (int i = 0; i < ClusterSize / 8; i++)
        {
            long block = (long)(BinaryPrimitives.ReadUInt64BigEndian(image.AsSpan((int)table + i * 8)) & L1Entry.OffsetMask);
            if (block != 0) tables.Add((block, ClusterSize, 2));
        }
        tables.Add(((long)h.SnapshotsOffset, (int)img.Engine.State.Snapshots.TableBytes, 8));
        return tables;
    }

    private static readonly (string What, Action<Qcow2Image, Random> Change)[] Changes =
    [
        ("write", (i, r) => i.Write(new byte[r.Next(1, 100_000)], r.NextInt64(0, (16 << 20) - 100_000))),
        ("write zeroes", (i, r) => i.WriteZeroes(r.NextInt64(0, 15 << 20), r.Next(1, 1 << 20))),
        ("discard", (i, r) => i.Discard(r.NextInt64(0, 15 << 20), r.Next(1, 1 << 20))),
        ("snapshot create", (i, _) => i.CreateSnapshot("new")),
        ("snapshot delete", (i, _) => i.DeleteSnapshot("a")),
        ("snapshot apply", (i, _) => i.ApplySnapshot("a")),
        ("save", (i, r) =>
        {
            using Qcow2VmStateArea area = i.OpenVmStateAreaForWriting();
            area.Write(new byte[r.Next(1, 300_000)], 0);
            area.Flush();
            i.CreateSnapshot("saved", new Qcow2SnapshotCreateOptions { VmStateSize = area.Length });
        }),
    ];

    [Fact]
    public void A_change_to_a_randomly_damaged_image_goes_ahead_or_leaves_it_as_it_was()
    {
        byte[] template = Template();
        List<(long Offset, int Length, int EntrySize)> tables = Tables(template);
        var failures = new List<string>();
        int wentAhead = 0, refusedUnchanged = 0, markedCorrupt = 0;
        for (int seed = 0; seed < 700; seed++)
        {
            var rng = new Random(seed);
            byte[] image = (byte[])template.Clone();
            string damage = Damage(image, tables, rng);
            (string what, Action<Qcow2Image, Random> change) = Changes[seed % Changes.Length];
            var device = new MemoryBlockDevice(image);
            Exception? refused = null;
            try
            {
                using var img = Qcow2Image.Open(device, "damaged.qcow2");
                change(img, rng);
            }
            catch (Exception e)
            {
                refused = e;
            }
            string where = $"seed {seed}, {damage}, {what}";
            if (refused is not null and not VmsnapException)
            {
                failures.Add($"{where}: {refused}");
                continue;
            }
            if (refused is null)
            {
                wentAhead++;
                continue;
            }
            byte[] after = device.ToArray();
            if (after.AsSpan().SequenceEqual(image))
            {
                refusedUnchanged++;
                continue;
            }
            byte[] marked = (byte[])image.Clone();
            marked[Qcow2Header.IncompatibleFeaturesOffset + 7] |= (byte)Qcow2Header.IncompatibleCorrupt;
            if (after.AsSpan().SequenceEqual(marked)) markedCorrupt++;
            else failures.Add($"{where}: refused ({refused.Message}) yet the image changed beyond the corrupt bit");
        }
        Assert.True(failures.Count == 0, $"{failures.Count} failures:\n{string.Join("\n", failures.Take(20))}");
        // The damage is of every kind: some changes go ahead, some are refused, some hit metadata.
        Assert.True(wentAhead > 100 && refusedUnchanged > 100 && markedCorrupt > 0, $"went ahead {wentAhead}, refused {refusedUnchanged}, marked corrupt {markedCorrupt}");
    }

    /// <summary>Overwrites one entry of one table with a value chosen to mislead: zero, a pointer to other metadata (COPIED), past the end, unaligned, or random.</summary>
    private static string Damage(byte[] image, List<(long Offset, int Length, int EntrySize)> tables, Random rng)
    {
        (long offset, int length, int entrySize) = tables[rng.Next(tables.Count)];
        // Refcounts of clusters the image uses (a free one wrongly counted free again is no damage).
        int entries = entrySize == 2 ? Math.Min(length / 2, image.Length / ClusterSize) : length / entrySize;
        int entry = rng.Next(Math.Max(1, entries));
        long at = offset + (long)entry * entrySize;
        if (at + entrySize > image.Length) return "nothing";
        if (entrySize == 2)
        {
            ushort v = (ushort)(rng.Next(5) switch { 0 or 1 => 0, 2 => 1, 3 => 2, _ => rng.Next(65536) });
            BinaryPrimitives.WriteUInt16BigEndian(image.AsSpan((int)at), v);
            return $"refcount entry at 0x{at:x} = {v}";
        }
        if (entrySize == 4)
        {
            uint v = (uint)rng.Next(4) switch { 0 => 0u, 1 => 1u, 2 => (uint)rng.Next(1 << 16), _ => (uint)rng.Next() };
            BinaryPrimitives.WriteUInt32BigEndian(image.AsSpan((int)at), v);
            return $"header word at 0x{at:x} = 0x{v:x}";
        }
        (long otherOffset, _, _) = tables[rng.Next(tables.Count)];
        ulong value = rng.Next(6) switch
        {
            0 => 0,
            1 => L2Entry.Copied | (ulong)(otherOffset & ~(long)(ClusterSize - 1)),
            2 => (ulong)(otherOffset & ~(long)(ClusterSize - 1)),
            3 => L2Entry.Copied | (ulong)(image.Length + rng.Next(1, 1000) * (long)ClusterSize),
            4 => L2Entry.Copied | (ulong)((otherOffset & ~(long)(ClusterSize - 1)) + 512),
            _ => (ulong)rng.NextInt64(),
        };
        BinaryPrimitives.WriteUInt64BigEndian(image.AsSpan((int)at), value);
        return $"entry at 0x{at:x} = 0x{value:x16}";
    }
}
