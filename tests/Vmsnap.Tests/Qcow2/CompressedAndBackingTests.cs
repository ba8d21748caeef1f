using Vmsnap.Qcow2;
using Vmsnap.Tests.Interop;

namespace Vmsnap.Tests.Qcow2;

/// <summary>Compressed clusters (qemu-img convert -c, zlib and zstd) and backing chains (qcow2 and raw backings).</summary>
[Trait("Category", "Unit")]
public class CompressedAndBackingTests
{
    /// <summary>A raw disk with incompressible, compressible and zero stretches (QEMU stores the incompressible ones uncompressed).</summary>
    private static string MixedRaw(TempDir dir, string name, long size, int seed)
    {
        string path = Qemu.SparseRaw(dir, name, size);
        var random = new Random(seed);
        using var f = new FileStream(path, FileMode.Open, FileAccess.Write);
        for (long pos = 0; pos < Math.Min(size, 24 << 20); pos += 96 * 1024)
        {
            byte[] chunk = new byte[random.Next(1, 96 * 1024)];
            switch (random.Next(3))
            {
                case 0: random.NextBytes(chunk); break;
                case 1: for (int i = 0; i < chunk.Length; i++) chunk[i] = (byte)"vmsnap qcow2 "[random.Next(13)]; break;
                default: continue;
            }
            f.Position = pos + random.Next(0, 1000);
            f.Write(chunk);
        }
        return path;
    }

    [QemuTheory]
    [InlineData("")]
    [InlineData("compression_type=zstd")]
    [InlineData("cluster_size=4k")]
    [InlineData("cluster_size=4k,compression_type=zstd")]
    [InlineData("cluster_size=512")]
    [InlineData("cluster_size=16k,extended_l2=on")]
    [InlineData("cluster_size=2M,compression_type=zstd")]
    [InlineData("compat=0.10")]
    public void Compressed_images_read_exactly_and_take_writes(string options)
    {
        using var dir = new TempDir();
        long size = 48 << 20;
        string source = MixedRaw(dir, "source.raw", size, seed: options.Length);
        string image = dir.File("c.qcow2");
        var args = new List<string> { "convert", "-c", "-f", "raw", "-O", "qcow2" };
        if (options.Length > 0) args.AddRange(["-o", options]);
        Tool.QemuImg([.. args, source, image]);
        (var json, _) = QemuImgCheck.Of(image);
        Assert.True(QemuImgCheck.Field(json, "compressed-clusters") > 0, "the image should hold compressed clusters");

        using (var img = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }))
        {
            Assert.Equal(options.Contains("zstd") ? Qcow2CompressionType.Zstd : Qcow2CompressionType.Zlib, img.Info.CompressionType);
            Qemu.AssertReadsLike(img, source, []);
            Qcow2CheckResult r = img.Check();
            Assert.True(r.IsClean, string.Join("\n", r.Messages));
            Assert.Equal(QemuImgCheck.Field(json, "compressed-clusters"), r.CompressedClusters);
            Assert.Equal(QemuImgCheck.Field(json, "allocated-clusters"), r.AllocatedClusters);
            Assert.Equal(QemuImgCheck.Field(json, "fragmented-clusters"), r.FragmentedClusters);
            Assert.Equal(QemuImgCheck.Field(json, "image-end-offset"), r.ImageEndOffset);
        }

        // Writing over compressed clusters: partial (merged with the decompressed cluster) and whole.
        string expected = dir.File("expected.raw");
        File.Copy(source, expected);
        OptionSet set = new("compressed", options, new() { ClusterSize = Qemu.Info(image).GetProperty("cluster-size").GetInt32() }, size);
        using (var img = Qcow2Image.Open(image))
            VmsnapWrittenImageTests.RandomWrites(img, expected, set, seed: 99, count: 24);
        QemuImgCheck.AssertClean(image);
        Qemu.AssertSameContent(image, expected);
    }

    [QemuTheory]
    [InlineData("qcow2", "")]
    [InlineData("raw", "")]
    [InlineData("qcow2", "cluster_size=16k,extended_l2=on")]
    [InlineData("qcow2", "compat=0.10,cluster_size=4k")]
    [InlineData("raw", "cluster_size=512")]
    public void Overlays_read_through_and_write_only_into_the_overlay(string baseFormat, string overlayOptions)
    {
        string version = QemuInstall.Current.Version;
        using var dir = new TempDir();
        long size = 32 << 20;
        string base_ = dir.File("base." + baseFormat);
        if (baseFormat == "raw")
        {
            File.Copy(MixedRaw(dir, "mixed.raw", size - (1 << 20), seed: 5), base_);   // smaller than the overlay
        }
        else
        {
            Qemu.Create(base_, size - (1 << 20));
            Qemu.Io(base_, "write -P 0xb1 0 3M", "write -P 0xb2 5000000 777777", "write -z 1M 64k");
        }
        string baseHash = Qemu.Hash(base_);
        string overlay = dir.File("overlay.qcow2");
        // qemu-img stores the backing name as given: relative to the overlay's folder.
        var args = new List<string> { "create", "-q", "-f", "qcow2", "-b", "base." + baseFormat, "-F", baseFormat };
        if (overlayOptions.Length > 0) args.AddRange(["-o", overlayOptions]);
        Tool.QemuImg([.. args, overlay, size.ToString()]);
        Qemu.Io(overlay, "write -P 0x0c 70000 5000", "write -z 2M 100k", "write -P 0x0d 4M 64k");

        string expected = Qemu.ToRaw(overlay, dir);
        using (var img = Qcow2Image.Open(overlay))
        {
            Assert.Equal("base." + baseFormat, img.Info.BackingFile);
            Assert.Equal(baseFormat, img.Info.BackingFormat);
            Qemu.AssertReadsLike(img, expected, []);
            int cs = img.ClusterSize;
            var random = new Random(8);
            // Partial clusters and subclusters over backing data: the rest comes from the backing file.
            foreach ((long offset, int length) in new[] { (17L, 3), (cs - 5L, 10), (3L * cs + cs / 64 + 1, cs / 3), (5_000_100L, 3 * cs), (size - (1 << 20) - 100, 300), (size - 10, 10) })
            {
                byte[] data = new byte[length];
                random.NextBytes(data);
                img.Write(data, offset);
                Qemu.WriteRaw(expected, offset, data);
            }
            img.WriteZeroes(8L * cs, 2L * cs);
            Qemu.WriteRaw(expected, 8L * cs, new byte[2 * cs]);
            img.Discard(12L * cs, 3L * cs);   // version 3 marks them zero so the backing data stays hidden; version 2 keeps them
            if (img.Info.Version >= 3) Qemu.WriteRaw(expected, 12L * cs, new byte[3 * cs]);
            Qemu.AssertReadsLike(img, expected, []);
        }
        Assert.Equal(baseHash, Qemu.Hash(base_));
        QemuImgCheck.AssertClean(overlay);
        Qemu.AssertSameContent(overlay, expected);
    }

    [QemuFact]
    public void A_three_image_chain_with_a_vmsnap_created_overlay_reads_like_qemu()
    {
        using var dir = new TempDir();
        string bottom = dir.File("bottom.raw"), middle = dir.File("middle.qcow2"), top = dir.File("top.qcow2");
        File.Copy(MixedRaw(dir, "m.raw", 8 << 20, seed: 2), bottom);
        Qemu.Create(middle, 16 << 20, "cluster_size=4k", "bottom.raw", "raw");
        Qemu.Io(middle, "write -P 0x42 1M 1M", "write -z 3M 8k");
        using (var img = Qcow2Image.Create(top, 24 << 20, new Qcow2CreateOptions { BackingFile = "middle.qcow2", BackingFormat = "qcow2", ExtendedL2 = true }))
        {
            img.Write(new byte[] { 1, 2, 3 }, (1 << 20) - 1);
        }
        var info = Qemu.Info(top);
        Assert.Equal("middle.qcow2", info.GetProperty("backing-filename").GetString());
        Assert.Equal("qcow2", info.GetProperty("backing-filename-format").GetString());
        QemuImgCheck.AssertClean(top);
        string expected = Qemu.ToRaw(top, dir);
        using var reopened = Qcow2Image.Open(top, new Qcow2OpenOptions { ReadOnly = true });
        Qemu.AssertReadsLike(reopened, expected, []);
    }

    [QemuFact]
    public void A_moved_backing_file_can_be_named_at_open_and_a_missing_one_is_a_clear_error()
    {
        using var dir = new TempDir();
        string base_ = dir.File("base.qcow2"), overlay = dir.File("overlay.qcow2");
        Qemu.Create(base_, 8 << 20);
        Qemu.Io(base_, "write -P 0x5e 0 1M");
        Qemu.Create(overlay, 8 << 20, "", "base.qcow2", "qcow2");
        Directory.CreateDirectory(dir.File("elsewhere"));
        string moved = dir.File("elsewhere/base.qcow2");
        File.Move(base_, moved);

        var e = Assert.Throws<Qcow2FormatException>(() => Qcow2Image.Open(overlay, new Qcow2OpenOptions { ReadOnly = true }));
        Assert.Contains("backing file 'base.qcow2' cannot be opened", e.Message);

        byte[] b = new byte[4];
        using (var img = Qcow2Image.Open(overlay, new Qcow2OpenOptions { ReadOnly = true, BackingFileOverride = moved }))
        {
            img.Read(b, 100);
            Assert.Equal(new byte[] { 0x5e, 0x5e, 0x5e, 0x5e }, b);
        }
        string hash = Qemu.Hash(overlay);
        using (var img = Qcow2Image.Open(overlay, new Qcow2OpenOptions { OpenBackingFile = false }))
        {
            img.Read(b, 100);
            Assert.Equal(new byte[4], b);   // without its backing file the overlay holds nothing there
            Assert.Throws<OperationRefusedException>(() => img.Write(b, 100));
        }
        Assert.Equal(hash, Qemu.Hash(overlay));
    }

    [QemuFact]
    public void Refcount_table_grows_and_moves_when_the_file_outgrows_it()
    {
        using var dir = new TempDir();
        foreach ((int refcountBits, long written) in new[] { (16, 12L << 20), (64, 9L << 20) })
        {
            string image = dir.File($"g{refcountBits}.qcow2");
            long size = 64 << 20;
            string raw = Qemu.SparseRaw(dir, $"g{refcountBits}.raw", size);
            var options = new Qcow2CreateOptions { ClusterSize = 512, RefcountBits = refcountBits };
            ulong tableBefore;
            using (var img = Qcow2Image.Create(image, size, options))
            {
                tableBefore = img.Engine.State.Header.RefcountTableOffset;
                var random = new Random(refcountBits);
                for (long done = 0; done < written;)
                {
                    int length = random.Next(1, 1 << 20);
                    long offset = random.NextInt64(0, size - length);
                    byte[] data = new byte[length];
                    random.NextBytes(data);
                    img.Write(data, offset);
                    Qemu.WriteRaw(raw, offset, data);
                    done += length;
                }
            }
            Qcow2Header h = Qemu.Header(image);
            Assert.NotEqual(tableBefore, h.RefcountTableOffset);
            Assert.True(h.RefcountTableClusters > 1, $"refcount table still {h.RefcountTableClusters} cluster(s)");
            QemuImgCheck.AssertClean(image);
            Qemu.AssertSameContent(image, raw);
        }
    }
}
