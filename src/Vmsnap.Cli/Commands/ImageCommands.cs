using System.CommandLine;
using System.Globalization;
using Vmsnap.Qcow2;
using Vmsnap.Storage;

namespace Vmsnap.Cli.Commands;

/// <summary>
/// Image commands: create, info, check, read, write. Exit codes: 0 success; 1 failure (one line on
/// stderr); 2 usage error. <c>check</c> follows qemu-img check: 0 clean, 1 the check could not be
/// completed, 2 corruptions found, 3 only leaked clusters found.
/// </summary>
internal static class ImageCommands
{
    internal const int CheckCorrupt = 2, CheckLeaks = 3;
    private const int ChunkSize = 4 << 20;

    internal static IEnumerable<CommandFactory> Build() =>
    [
        new("create", CreateCommand),
        new("info", InfoCommand),
        new("check", CheckCommand),
        new("read", ReadCommand),
        new("write", WriteCommand),
    ];

    private static Command CreateCommand()
    {
        var image = new Argument<string>("IMAGE") { Description = "Image file to create (replaced if it exists)" };
        var size = new Argument<string>("SIZE") { Description = "Virtual disk size: bytes or with a k, M, G, T suffix (a multiple of 512)" };
        var clusterSize = new Option<string?>("--cluster-size") { Description = "Cluster size in bytes (512 to 2M, power of two; default 64k)" };
        var refcountBits = new Option<int?>("--refcount-bits") { Description = "Refcount width: 1, 2, 4, 8, 16, 32 or 64 (default 16)" };
        var compat = new Option<string?>("--compat") { Description = "Format version: 1.1 (default, version 3) or 0.10 (version 2)" };
        compat.AcceptOnlyFromAmong("0.10", "1.1");
        var lazy = new Option<bool>("--lazy-refcounts") { Description = "Set the lazy_refcounts feature" };
        var extendedL2 = new Option<bool>("--extended-l2") { Description = "Use extended L2 entries (32 subclusters per cluster; clusters of 16k or more)" };
        var compression = new Option<string?>("--compression-type") { Description = "Compression type for compressed clusters: zlib (default) or zstd" };
        compression.AcceptOnlyFromAmong("zlib", "zstd");
        var backing = new Option<string?>("--backing") { Description = "Backing file (stored as given; relative names are resolved against the image's folder)" };
        var backingFormat = new Option<string?>("--backing-format") { Description = "Backing file format: raw or qcow2" };
        backingFormat.AcceptOnlyFromAmong("raw", "qcow2");
        var json = Cli.JsonOption();
        var command = new Command("create", "Create a qcow2 image (defaults as qemu-img create -f qcow2)")
        {
            image, size, clusterSize, refcountBits, compat, lazy, extendedL2, compression, backing, backingFormat, json,
        };
        command.SetHandler((parse, ct) =>
        {
            string? backingFile = parse.GetValue(backing);
            string? format = parse.GetValue(backingFormat);
            if (format is not null && backingFile is null) throw new ArgumentException("--backing-format needs --backing");
            if (backingFile is not null && format is null) throw new ArgumentException("--backing needs --backing-format raw|qcow2");
            var options = new Qcow2CreateOptions
            {
                ClusterSize = parse.GetValue(clusterSize) is { } cs ? Cli.ParseInt32Size(cs) : 64 * 1024,
                RefcountBits = parse.GetValue(refcountBits) ?? 16,
                Version = parse.GetValue(compat) == "0.10" ? 2 : 3,
                LazyRefcounts = parse.GetValue(lazy),
                ExtendedL2 = parse.GetValue(extendedL2),
                CompressionType = parse.GetValue(compression) == "zstd" ? Qcow2CompressionType.Zstd : Qcow2CompressionType.Zlib,
                BackingFile = backingFile,
                BackingFormat = format,
            };
            string path = parse.GetValue(image)!;
            long bytes = Cli.ParseSize(parse.GetValue(size)!);
            Qcow2ImageInfo info;
            using (Qcow2Image created = Qcow2Image.Create(path, bytes, options)) info = created.Info;
            if (parse.GetValue(json))
            {
                Cli.WriteJson(QemuImgJson.Info(path, info, []), CliJson.Default.ImageInfo);
            }
            else
            {
                string backingText = backingFile is null ? "" : $" backing_file={backingFile} backing_fmt={format}";
                Console.Out.WriteLine(
                    $"Formatting '{path}', fmt=qcow2 cluster_size={info.ClusterSize} extended_l2={OnOff(info.ExtendedL2)} " +
                    $"compression_type={CompressionName(info.CompressionType)} size={info.VirtualSize}{backingText} " +
                    $"lazy_refcounts={OnOff(info.LazyRefcounts)} refcount_bits={info.RefcountBits} compat={info.Compat}");
            }
            return Cli.ExitOk;
        });
        return command;
    }

    private static Command InfoCommand()
    {
        var image = new Argument<string>("IMAGE") { Description = "The qcow2 image" };
        var forceShare = SnapshotCommands.ForceShareOption();
        var json = Cli.JsonOption();
        var command = new Command("info", "Show an image's settings (like qemu-img info)") { image, forceShare, json };
        command.SetHandler((parse, ct) =>
        {
            // Inspection only: the backing chain need not be there. Like qemu-img, refused while
            // another process writes the image unless --force-share.
            var options = new Qcow2OpenOptions { ReadOnly = true, ForceShare = parse.GetValue(forceShare), OpenBackingFile = false };
            string path = parse.GetValue(image)!;
            using Qcow2Image img = Qcow2Image.Open(path, options);
            Qcow2ImageInfo info = img.Info;
            if (parse.GetValue(json))
            {
                Cli.WriteJson(QemuImgJson.Info(path, info, img.Snapshots), CliJson.Default.ImageInfo);
                return Cli.ExitOk;
            }
            var o = Console.Out;
            o.WriteLine($"image: {info.Path}");
            o.WriteLine("file format: qcow2");
            o.WriteLine($"virtual size: {Cli.FormatSize(info.VirtualSize)} ({info.VirtualSize} bytes)");
            o.WriteLine($"file size: {Cli.FormatSize(info.FileSize)} ({info.FileSize} bytes)");
            o.WriteLine($"cluster_size: {info.ClusterSize}");
            if (info.BackingFile is not null) o.WriteLine($"backing file: {info.BackingFile}");
            if (info.BackingFormat is not null) o.WriteLine($"backing file format: {info.BackingFormat}");
            if (info.SnapshotCount > 0) o.WriteLine($"snapshots: {info.SnapshotCount}");
            o.WriteLine("Format specific information:");
            o.WriteLine($"    compat: {info.Compat}");
            o.WriteLine($"    compression type: {CompressionName(info.CompressionType)}");
            o.WriteLine($"    lazy refcounts: {TrueFalse(info.LazyRefcounts)}");
            o.WriteLine($"    refcount bits: {info.RefcountBits}");
            o.WriteLine($"    corrupt: {TrueFalse(info.Corrupt)}");
            o.WriteLine($"    extended l2: {TrueFalse(info.ExtendedL2)}");
            if (info.Dirty) o.WriteLine("    dirty: true");
            return Cli.ExitOk;
        });
        return command;
    }

    private static Command CheckCommand()
    {
        var image = new Argument<string>("IMAGE") { Description = "The qcow2 image" };
        var repair = new Option<string?>("--repair", "-r") { Description = "Repair: leaks (free leaked clusters) or all (also wrong refcounts and COPIED flags)" };
        repair.AcceptOnlyFromAmong("leaks", "all");
        var forceShare = SnapshotCommands.ForceShareOption();
        var json = Cli.JsonOption();
        var command = new Command("check", "Check an image's consistency like qemu-img check (exit 0 clean, 1 check failed, 2 corruptions, 3 leaks only)")
        {
            image, repair, forceShare, json,
        };
        command.AddExitCodes(
            (Cli.ExitOk, "no errors found (after a repair: none left)"),
            (Cli.ExitFailure, "the check could not be completed (or the image could not be opened)"),
            (CheckCorrupt, "corruptions found (also a usage error, as for every command)"),
            (CheckLeaks, "leaked clusters found, but no corruptions"));
        command.SetHandler((parse, ct) =>
        {
            Qcow2RepairMode mode = parse.GetValue(repair) switch { "leaks" => Qcow2RepairMode.Leaks, "all" => Qcow2RepairMode.All, _ => Qcow2RepairMode.None };
            string path = parse.GetValue(image)!;
            bool shared = parse.GetValue(forceShare);
            if (shared && mode != Qcow2RepairMode.None) throw new ArgumentException("--force-share cannot be used with --repair");
            Qcow2CheckResult r = Qcow2Image.Check(path, mode, shared);
            if (parse.GetValue(json)) Cli.WriteJson(QemuImgJson.Check(path, r), CliJson.Default.ImageCheck);
            else PrintCheck(r);
            return r.CheckErrors > 0 ? Cli.ExitFailure : r.Corruptions > 0 ? CheckCorrupt : r.Leaks > 0 ? CheckLeaks : Cli.ExitOk;
        });
        return command;
    }

    private static void PrintCheck(Qcow2CheckResult r)
    {
        var o = Console.Out;
        foreach (string m in r.Messages) o.WriteLine(m);
        if (r.CorruptionsFixed + r.LeaksFixed > 0)
        {
            o.WriteLine("The following inconsistencies were found and repaired:");
            o.WriteLine();
            o.WriteLine($"    {r.LeaksFixed} leaked clusters");
            o.WriteLine($"    {r.CorruptionsFixed} corruptions");
            o.WriteLine();
            o.WriteLine("Double checking the fixed image now...");
        }
        if (r.IsClean) o.WriteLine("No errors were found on the image.");
        if (r.Corruptions > 0)
        {
            o.WriteLine();
            o.WriteLine($"{r.Corruptions} errors were found on the image.");
            o.WriteLine("Data may be corrupted, or further writes to the image may corrupt it.");
        }
        if (r.Leaks > 0)
        {
            o.WriteLine();
            o.WriteLine($"{r.Leaks} leaked clusters were found on the image.");
            o.WriteLine("This means waste of disk space, but no harm to data.");
        }
        if (r.CheckErrors > 0)
        {
            o.WriteLine();
            o.WriteLine($"{r.CheckErrors} internal errors have occurred during the check.");
        }
        if (r.TotalClusters != 0 && r.AllocatedClusters != 0)
        {
            o.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"{r.AllocatedClusters}/{r.TotalClusters} = {r.AllocatedClusters * 100.0 / r.TotalClusters:0.00}% allocated, " +
                $"{r.FragmentedClusters * 100.0 / r.AllocatedClusters:0.00}% fragmented, {r.CompressedClusters * 100.0 / r.AllocatedClusters:0.00}% compressed clusters"));
        }
        if (r.ImageEndOffset != 0) o.WriteLine($"Image end offset: {r.ImageEndOffset}");
    }

    private static Command ReadCommand()
    {
        var image = new Argument<string>("IMAGE") { Description = "The qcow2 image" };
        var offset = new Argument<string>("OFFSET") { Description = "Guest offset in bytes (k, M, G suffixes allowed)" };
        var length = new Argument<string>("LENGTH") { Description = "Number of bytes to read" };
        var to = new Option<string>("--to") { Description = "File to write the bytes to (replaced)", Required = true };
        var forceShare = SnapshotCommands.ForceShareOption();
        var json = Cli.JsonOption();
        var command = new Command("read", "Read guest bytes of an image into a file") { image, offset, length, to, forceShare, json };
        command.SetHandler((parse, ct) =>
        {
            long start = Cli.ParseSize(parse.GetValue(offset)!);
            long count = Cli.ParseSize(parse.GetValue(length)!);
            using Qcow2Image img = Qcow2Image.Open(parse.GetValue(image)!, new Qcow2OpenOptions { ReadOnly = true, ForceShare = parse.GetValue(forceShare) });
            if (start > img.VirtualSize - count)
                throw new ArgumentException($"range of {count} bytes at offset {start} lies beyond the virtual disk ({img.VirtualSize} bytes)");
            string target = parse.GetValue(to)!;
            // Into a temporary file renamed over the target once complete: a failed read leaves the target as it was.
            string full = Path.GetFullPath(target);
            string temp = Cli.ScratchPathBeside(full);
            try
            {
                using (var file = new FileStream(temp, FileMode.CreateNew, FileAccess.Write))
                {
                    byte[] buffer = new byte[(int)Math.Min(ChunkSize, Math.Max(count, 1))];
                    for (long done = 0; done < count;)
                    {
                        ct.ThrowIfCancellationRequested();
                        int n = (int)Math.Min(buffer.Length, count - done);
                        img.Read(buffer.AsSpan(0, n), start + done);
                        file.Write(buffer, 0, n);
                        done += n;
                    }
                }
                File.Move(temp, full, overwrite: true);
            }
            finally
            {
                File.Delete(temp);
            }
            if (parse.GetValue(json)) Cli.WriteJson(new TransferJson(img.Path, start, count, target), CliJson.Default.TransferJson);
            else Console.Out.WriteLine($"read {count}/{count} bytes at offset {start}");
            return Cli.ExitOk;
        });
        return command;
    }

    private static Command WriteCommand()
    {
        var image = new Argument<string>("IMAGE") { Description = "The qcow2 image" };
        var offset = new Argument<string>("OFFSET") { Description = "Guest offset in bytes (k, M, G suffixes allowed)" };
        var from = new Option<string>("--from") { Description = "File whose bytes are written", Required = true };
        var json = Cli.JsonOption();
        var command = new Command("write", "Write a file's bytes into an image at a guest offset") { image, offset, from, json };
        command.SetHandler((parse, ct) =>
        {
            long start = Cli.ParseSize(parse.GetValue(offset)!);
            string source = parse.GetValue(from)!;
            using var file = new FileStream(source, FileMode.Open, FileAccess.Read);
            long count = file.Length;
            using Qcow2Image img = Qcow2Image.Open(parse.GetValue(image)!);
            if (start > img.VirtualSize - count)
                throw new ArgumentException($"{count} bytes at offset {start} would go beyond the virtual disk ({img.VirtualSize} bytes)");
            byte[] buffer = new byte[(int)Math.Min(ChunkSize, Math.Max(count, 1))];
            for (long done = 0; done < count;)
            {
                ct.ThrowIfCancellationRequested();
                int n = file.ReadAtLeast(buffer.AsSpan(0, (int)Math.Min(buffer.Length, count - done)), 1, throwOnEndOfStream: true);
                img.Write(buffer.AsSpan(0, n), start + done);
                done += n;
            }
            img.Flush();
            if (parse.GetValue(json)) Cli.WriteJson(new TransferJson(img.Path, start, count, source), CliJson.Default.TransferJson);
            else Console.Out.WriteLine($"wrote {count}/{count} bytes at offset {start}");
            return Cli.ExitOk;
        });
        return command;
    }

    private static string OnOff(bool value) => value ? "on" : "off";
    private static string TrueFalse(bool value) => value ? "true" : "false";
    internal static string CompressionName(Qcow2CompressionType type) => type == Qcow2CompressionType.Zstd ? "zstd" : "zlib";

    /// <summary>JSON of <c>read --json</c> and <c>write --json</c>.</summary>
    internal sealed record TransferJson(string Filename, long Offset, long Bytes, string File);
}
