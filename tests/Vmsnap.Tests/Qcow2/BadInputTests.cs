using Vmsnap.Qcow2;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Qcow2;

/// <summary>Broken images: a clear error naming the problem and where, no crash, no hang, the file unchanged.</summary>
[Trait("Category", "Unit")]
public class BadInputTests
{
    private static string Good(TempDir dir, string name = "bad.qcow2", string options = "")
    {
        string image = dir.File(name);
        Qemu.Create(image, 64 << 20, options);
        Qemu.Io(image, "write -P 0x11 0 128k", "write -P 0x22 3M 64k");
        return image;
    }

    /// <summary>Opening (read-only and writable) fails with a Qcow2FormatException whose message contains every given word; the file keeps its bytes.</summary>
    private static Qcow2FormatException AssertRefused(string image, params string[] words)
    {
        string hash = Qemu.Hash(image);
        Qcow2FormatException? last = null;
        foreach (bool readOnly in new[] { true, false })
        {
            last = Assert.Throws<Qcow2FormatException>(() => Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = readOnly }).Dispose());
            foreach (string w in words) Assert.Contains(w, last.Message, StringComparison.OrdinalIgnoreCase);
            Assert.Contains(image, last.Message);
        }
        Assert.Equal(hash, Qemu.Hash(image));
        return last!;
    }

    [QemuFact]
    public void Truncated_headers()
    {
        using var dir = new TempDir();
        string image = Good(dir);
        byte[] whole = File.ReadAllBytes(image);
        foreach (int length in new[] { 0, 3, 50, 90 })
        {
            string cut = dir.File($"cut{length}.qcow2");
            File.WriteAllBytes(cut, whole.AsSpan(0, length).ToArray());
            AssertRefused(cut, "truncated");
        }
    }

    [QemuFact]
    public void Bad_magic()
    {
        using var dir = new TempDir();
        string image = Good(dir);
        Qemu.WriteBE32(image, 0, 0x514649fa);
        var e = AssertRefused(image, "magic", "not a qcow2 image");
        Assert.Equal(0, e.FileOffset);
    }

    [QemuTheory]
    [InlineData(1u)]
    [InlineData(4u)]
    public void Unsupported_versions(uint qcow2Version)
    {
        string version = QemuInstall.Current.Version;
        using var dir = new TempDir();
        string image = Good(dir);
        Qemu.WriteBE32(image, 4, qcow2Version);
        AssertRefused(image, $"version {qcow2Version}");
    }

    [QemuTheory]
    [InlineData(8u)]
    [InlineData(22u)]
    [InlineData(63u)]
    public void Cluster_bits_out_of_range(uint bits)
    {
        using var dir = new TempDir();
        string image = Good(dir);
        Qemu.WriteBE32(image, 20, bits);
        AssertRefused(image, $"cluster_bits {bits}", "out of range");
    }

    [QemuFact]
    public void L1_table_beyond_the_end_of_the_file()
    {
        using var dir = new TempDir();
        string image = Good(dir);
        Qemu.WriteBE64(image, 40, 1UL << 40);
        var e = AssertRefused(image, "L1 table", "beyond the end of the file");
        Assert.Equal(1L << 40, e.FileOffset);
    }

    [QemuFact]
    public void L1_size_too_large()
    {
        using var dir = new TempDir();
        string image = Good(dir);
        Qemu.WriteBE32(image, 36, 0x1000_0000);
        AssertRefused(image, "l1_size", "too large");
    }

    [QemuFact]
    public void L1_size_too_small_for_the_disk()
    {
        using var dir = new TempDir();
        string image = Good(dir);
        Qemu.WriteBE64(image, 24, 1UL << 40);   // 1 TiB disk with a one-entry L1 table
        AssertRefused(image, "l1_size", "too small");
    }

    [QemuTheory]
    [InlineData(0UL)]
    [InlineData(512UL)]
    public void Refcount_table_overlapping_the_header(ulong offset)
    {
        using var dir = new TempDir();
        string image = Good(dir);
        Qemu.WriteBE64(image, 48, offset);
        AssertRefused(image, "refcount table", offset == 0 ? "header" : "aligned");
    }

    [QemuFact]
    public void Refcount_table_beyond_the_end_of_the_file()
    {
        using var dir = new TempDir();
        string image = Good(dir);
        Qemu.WriteBE64(image, 48, 1UL << 36);
        AssertRefused(image, "refcount table", "beyond the end of the file");
    }

    [QemuFact]
    public void An_L2_entry_pointing_past_the_end_of_the_file()
    {
        using var dir = new TempDir();
        string image = Good(dir);
        long l2 = (long)(Qemu.ReadBE64(image, (long)Qemu.Header(image).L1TableOffset) & L1Entry.OffsetMask);
        Qemu.WriteBE64(image, l2 + 8, L2Entry.Copied | (1UL << 40));   // guest cluster 1 (64 KiB .. 128 KiB)
        string hash = Qemu.Hash(image);
        using (var img = Qcow2Image.Open(image))
        {
            byte[] first = new byte[65536];
            img.Read(first, 0);                        // the healthy cluster still reads
            Assert.All(first, b => Assert.Equal(0x11, b));
            var e = Assert.Throws<Qcow2FormatException>(() => img.Read(new byte[10], 65536 + 5));
            Assert.Contains("L2 table entry 1", e.Message);
            Assert.Contains("beyond the end of the file", e.Message);
            Assert.Equal(l2 + 8, e.FileOffset);
            Assert.Throws<Qcow2FormatException>(() => img.Write(new byte[10], 65536 + 5));
            Assert.Throws<Qcow2FormatException>(() => img.Write(new byte[10], 3 << 20));   // any write: the image is corrupt
            Qcow2CheckResult r = img.Check();
            Assert.True(r.Corruptions > 0);
        }
        Assert.Equal(hash, Qemu.Hash(image));
    }

    [QemuFact]
    public void Two_L2_entries_sharing_a_cluster_with_refcount_1_are_detected_and_writes_refused()
    {
        // vmsnap's choice: refuse. Writing in place would silently change the other guest cluster
        // too; copying would need a refcount the image does not have. Repair first.
        using var dir = new TempDir();
        string image = Good(dir);
        long l2 = (long)(Qemu.ReadBE64(image, (long)Qemu.Header(image).L1TableOffset) & L1Entry.OffsetMask);
        ulong entry0 = Qemu.ReadBE64(image, l2);
        long shared = 48;   // guest cluster 48 (3 MiB) gets guest cluster 0's host cluster
        Qemu.WriteBE64(image, l2 + shared * 8, entry0);
        string hash = Qemu.Hash(image);
        using (var img = Qcow2Image.Open(image))
        {
            Qcow2CheckResult r = img.Check();
            Assert.Equal(1, r.Corruptions);
            Assert.Contains(r.Messages, m => m.StartsWith("ERROR cluster", StringComparison.Ordinal) && m.EndsWith("refcount=1 reference=2", StringComparison.Ordinal));
            Assert.Contains(r.Findings, f => f.Kind == Qcow2CheckFindingKind.Error && f.Text.EndsWith("refcount=1 reference=2", StringComparison.Ordinal));
            foreach (long offset in new[] { 100L, shared * 65536 + 100, 10L << 20 })
            {
                var e = Assert.Throws<Qcow2FormatException>(() => img.Write(new byte[] { 1, 2, 3 }, offset));
                Assert.True(e.RepairNeeded, e.Message);
            }
            byte[] a = new byte[65536], b = new byte[65536];
            img.Read(a, 0);
            img.Read(b, shared * 65536);
            Assert.Equal(a, b);
        }
        Assert.Equal(hash, Qemu.Hash(image));

        // After the repair the refcount is 2, COPIED flags are clear, and a write copies the cluster.
        using (var img = Qcow2Image.Open(image))
        {
            Assert.True(img.Check(Qcow2RepairMode.All).IsClean);
            img.Write(new byte[] { 7, 7, 7 }, 100);
            byte[] b = new byte[3];
            img.Read(b, shared * 65536 + 100);
            Assert.Equal(new byte[] { 0x11, 0x11, 0x11 }, b);
        }
        QemuImgCheck.AssertClean(image);
    }

    [QemuFact]
    public void Unknown_incompatible_features_are_refused_by_name()
    {
        using var dir = new TempDir();
        string image = Good(dir);
        Qcow2Header h = Qemu.Header(image);
        Assert.NotNull(h.FindExtension(HeaderExtension.FeatureNameTable));
        var names = h.FeatureNames;
        names.Add(new FeatureName(FeatureKind.Incompatible, 10, "frobnication"));
        int i = h.Extensions.FindIndex(x => x.Type == HeaderExtension.FeatureNameTable);
        h.Extensions[i] = new HeaderExtension(HeaderExtension.FeatureNameTable, FeatureName.Encode(names));
        h.IncompatibleFeatures |= 1UL << 10;
        Qemu.WriteRaw(image, 0, h.EncodeCluster());
        Assert.Contains("frobnication", Tool.Run("qemu-img", ["info", image]).Stderr);   // QEMU refuses it too, by name
        AssertRefused(image, "'frobnication' (bit 10)", "incompatible");

        h.IncompatibleFeatures = 1UL << 11;      // no name in the table
        Qemu.WriteRaw(image, 0, h.EncodeCluster());
        AssertRefused(image, "unknown incompatible feature bit 11");

        h.IncompatibleFeatures = Qcow2Header.IncompatibleExternalData;   // known to QEMU, not supported by vmsnap
        Qemu.WriteRaw(image, 0, h.EncodeCluster());
        AssertRefused(image, "'external data file' (bit 2)");
    }

    [QemuFact]
    public void A_corrupt_image_is_read_only()
    {
        using var dir = new TempDir();
        string image = Good(dir);
        Qemu.WriteBE64(image, 72, Qcow2Header.IncompatibleCorrupt);
        string hash = Qemu.Hash(image);
        using (var img = Qcow2Image.Open(image))
        {
            Assert.True(img.Info.Corrupt);
            byte[] b = new byte[4];
            img.Read(b, 0);
            Assert.Equal(new byte[] { 0x11, 0x11, 0x11, 0x11 }, b);
            var e = Assert.Throws<Qcow2FormatException>(() => img.Write(b, 0));
            Assert.Contains("corrupt", e.Message);
            Assert.Throws<Qcow2FormatException>(() => img.WriteZeroes(0, 65536));
            Assert.Throws<Qcow2FormatException>(() => img.Discard(0, 65536));
        }
        Assert.Equal(hash, Qemu.Hash(image));
        // check --repair all on a consistent image clears the bit, as qemu-img does.
        using (var img = Qcow2Image.Open(image)) Assert.True(img.Check(Qcow2RepairMode.All).IsClean);
        Assert.False(Qemu.Info(image).GetProperty("format-specific").GetProperty("data").GetProperty("corrupt").GetBoolean());
    }

    [QemuFact]
    public void Compression_type_without_its_feature_bit()
    {
        using var dir = new TempDir();
        string image = Good(dir);
        Qemu.WriteRaw(image, 104, new byte[] { 1 });
        AssertRefused(image, "compression type");
    }

    [QemuFact]
    public void Snapshot_table_past_the_end_of_the_file()
    {
        using var dir = new TempDir();
        string image = Good(dir);
        Tool.QemuImg("snapshot", "-c", "s", image);
        Qemu.WriteBE64(image, 64, 1UL << 40);
        AssertRefused(image, "snapshot table", "beyond the end of the file");
    }

    [QemuFact]
    public void Garbage_files_never_crash_or_hang_and_accepted_writes_stay_consistent()
    {
        using var dir = new TempDir();
        string image = Good(dir);
        byte[] original = File.ReadAllBytes(image);
        var random = new Random(1234);
        int written = 0;
        for (int round = 0; round < 400; round++)
        {
            byte[] bytes = (byte[])original.Clone();
            // Change bytes in the header, refcount table, refcount block, L1 table and first L2 table.
            for (int k = 0; k < 1 + round % 4; k++)
            {
                int at = random.Next(5) switch
                {
                    0 => random.Next(0, 112),
                    1 => 0x10000 + random.Next(0, 64),
                    2 => 0x20000 + random.Next(0, 64),
                    3 => 0x30000 + random.Next(0, 8),
                    _ => 0x40000 + random.Next(0, 512),
                };
                if (at < bytes.Length) bytes[at] = (byte)random.Next(256);
            }
            string path = dir.File("fuzz.qcow2");
            File.WriteAllBytes(path, bytes);
            bool writable = round % 4 == 0;
            bool wrote = false;
            try
            {
                using var img = Qcow2Image.Open(path, new Qcow2OpenOptions { ReadOnly = !writable });
                byte[] buffer = new byte[200_000];
                img.Read(buffer, 0);
                img.Check();
                if (writable)
                {
                    img.Write(buffer.AsSpan(0, 70_000), 30_000);
                    wrote = true;
                }
            }
            catch (VmsnapException)
            {
                // a clear refusal is fine
            }
            catch (ArgumentException)
            {
                // e.g. a virtual size so small the read range is outside it
            }
            if (wrote)
            {
                // vmsnap only writes into images its check finds free of corruption; QEMU must agree afterwards.
                QemuImgCheck c = QemuImgCheck.Attempt(path);
                if (c.ExitCode is 0 or 2 or 3)
                {
                    Assert.True(c.Corruptions == 0, $"round {round}: {c}");
                    written++;
                }
            }
        }
        Assert.True(written > 10, $"only {written} fuzzed images took a write");
    }
}
