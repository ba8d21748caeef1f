using System.CommandLine;
using System.IO.Hashing;
using System.Text.Json.Serialization;
using Vmsnap.Migration;
using Vmsnap.Qcow2;
using Vmsnap.Snapshots;
using Vmsnap.VmState;
using Vmsnap.VmState.LowLevel;

namespace Vmsnap.Cli.Commands;

/// <summary>
/// The built-in demonstration (no arguments): in a temporary folder, makes an image and a synthetic guest
/// RAM (random, text-like and zero pages), saves it as a snapshot in buffered mode and in gather mode, loads
/// both back, verifies the RAM by hash, checks the image, and prints both throughputs side by side.
/// Exit code 0 when everything verified.
/// </summary>
internal static class DemoCommand
{
    private const long DiskSize = 1L << 30;
    private const int PageSize = 4096;

    internal static CommandFactory Build() => new("demo", Create);

    private static Command Create()
    {
        var command = new Command("demo", "Run the built-in demonstration on a temporary folder (no arguments needed)");
        var json = Cli.JsonOption();
        var keep = new Option<bool>("--keep") { Description = "Keep the temporary folder, the image and the RAM files" };
        var ramSize = new Option<string>("--ram-size") { Description = "Size of the synthetic guest RAM (default 1G)", DefaultValueFactory = _ => "1G" };
        var folder = new Option<string?>("--dir") { Description = "Where to make the temporary folder (default: the system's temp folder)" };
        command.Options.Add(json);
        command.Options.Add(keep);
        command.Options.Add(ramSize);
        command.Options.Add(folder);
        command.SetHandler((parse, ct) =>
        {
            bool asJson = parse.GetValue(json);
            long ram = Cli.ParseSize(parse.GetValue(ramSize)!);
            if (ram <= 0 || ram % (1 << 20) != 0) throw new ArgumentException("--ram-size must be a positive whole number of MiB");
            string id = "vmsnap-demo-" + Guid.NewGuid().ToString("N")[..8];
            string dir = Path.Combine(parse.GetValue(folder) ?? Path.GetTempPath(), id);
            // Guest RAM is memory: keep the RAM files in /dev/shm when it has room, the image on disk.
            string ramDir = RamFolder(id, ram) ?? dir;
            Directory.CreateDirectory(dir);
            Directory.CreateDirectory(ramDir);
            try
            {
                DemoResult result = Run(dir, ramDir, ram, asJson ? null : Console.Out, ct);
                if (asJson) Cli.WriteJson(result, CliJson.Default.DemoResult);
                if (!result.Verified) Console.Error.WriteLine("vmsnap: demo failed: RAM loaded back differs from the RAM saved");
                else if (!result.CheckClean) Console.Error.WriteLine("vmsnap: demo failed: the image check found problems");
                return result.Verified && result.CheckClean ? Cli.ExitOk : Cli.ExitFailure;
            }
            finally
            {
                if (parse.GetValue(keep)) Console.Error.WriteLine($"vmsnap: kept {dir}{(ramDir != dir ? " and " + ramDir : "")}");
                else
                {
                    Directory.Delete(dir, recursive: true);
                    if (ramDir != dir) Directory.Delete(ramDir, recursive: true);
                }
            }
        });
        return command;
    }

    internal sealed record DemoRun(string Mode, string Snapshot, long VmStateSize, double SaveSeconds,
        [property: JsonPropertyName("save-mib-per-second")] double SaveMiBPerSecond,
        double LoadSeconds, [property: JsonPropertyName("load-mib-per-second")] double LoadMiBPerSecond, bool Verified);

    internal sealed record DemoResult([property: JsonPropertyName("filename")] string Image, long RamSize, long ZeroPages, IReadOnlyList<DemoRun> Runs,
        double BufferedSpeedup, bool Verified, bool CheckClean, int Corruptions, int Leaks);

    /// <summary>A folder in /dev/shm for the RAM files if it can hold three guests' worth, else null.</summary>
    private static string? RamFolder(string id, long ramBytes)
    {
        const string shm = "/dev/shm";
        try
        {
            if (Directory.Exists(shm) && new DriveInfo(shm).AvailableFreeSpace > 3 * ramBytes + (256L << 20))
                return Path.Combine(shm, id);
        }
        catch (IOException) { }
        return null;
    }

    internal static DemoResult Run(string dir, string ramDir, long ramBytes, TextWriter? log, CancellationToken ct)
    {
        string image = Path.Combine(dir, "demo.qcow2"), ramFile = Path.Combine(ramDir, "guest-ram.bin");
        log?.WriteLine($"vmsnap demo: image in {dir}, guest RAM files in {ramDir}");
        long zeroPages = MakeGuestRam(ramFile, ramBytes, seed: 2026);
        UInt128 expected = Hash(ramFile);
        log?.WriteLine($"  guest RAM: {Cli.FormatSize(ramBytes)} ({zeroPages} of {ramBytes / PageSize} pages zero, the rest random or text-like)");

        using (var img = Qcow2Image.Create(image, DiskSize))
        {
            // Some disk content too, so the snapshots capture a disk as well as the VM state.
            byte[] disk = new byte[4 << 20];
            new Random(7).NextBytes(disk);
            img.Write(disk, 0);
            img.Flush();
        }
        log?.WriteLine($"  image: {image} ({Cli.FormatSize(DiskSize)} disk, 64 KiB clusters)");

        var runs = new List<DemoRun>();
        foreach (var mode in new[] { VmStateWriteMode.Buffered, VmStateWriteMode.Gather })
        {
            string name = "demo-" + mode.ToString().ToLowerInvariant();
            VmSnapshotResult saved;
            using (var profile = MachineProfile.Create("none", [new("ram0", ramFile)]))
            using (var progress = ProgressLine.Start($"saving ({name})", ramBytes, log is null))
                saved = VmSnapshots.Save(image, name, profile, new VmSnapshotOptions { Mode = mode }, progress, ct);

            string loadedFile = Path.Combine(ramDir, $"loaded-{name}.bin");
            VmSnapshotResult loaded;
            using (var progress = ProgressLine.Start($"loading ({name})", 0, log is null))
                loaded = VmSnapshots.Load(image, name, [new("ram0", loadedFile)], null, progress, ct);
            bool same = Hash(loadedFile) == expected;
            File.Delete(loadedFile);
            runs.Add(new DemoRun(mode.ToString().ToLowerInvariant(), name, saved.VmStateBytes, saved.Seconds, saved.MiBPerSecond,
                loaded.Seconds, loaded.MiBPerSecond, same));
            log?.WriteLine($"  saved snapshot '{name}' ({Cli.FormatSize(saved.VmStateBytes)} of VM state), loaded it back: RAM {(same ? "identical" : "DIFFERENT")}");
        }

        Qcow2CheckResult check;
        using (var img = Qcow2Image.Open(image, new Qcow2OpenOptions { ReadOnly = true }))
            check = img.Check();
        double speedup = runs[1].SaveSeconds / runs[0].SaveSeconds;

        if (log is not null)
        {
            log.WriteLine();
            log.WriteLine($"  {"mode",-9} {"save s",8} {"save MiB/s",11} {"load s",8} {"load MiB/s",11}  RAM");
            foreach (var r in runs)
                log.WriteLine($"  {r.Mode,-9} {r.SaveSeconds,8:0.000} {r.SaveMiBPerSecond,11:0} {r.LoadSeconds,8:0.000} {r.LoadMiBPerSecond,11:0}  {(r.Verified ? "verified" : "DIFFERENT")}");
            log.WriteLine($"  buffered save is {speedup:0.00}x the speed of gather save");
            log.WriteLine($"  image check: {(check.IsClean ? "no errors, no leaks" : $"{check.Corruptions} corruptions, {check.Leaks} leaks")}");
        }
        return new DemoResult(image, ramBytes, zeroPages, runs, speedup, runs.All(r => r.Verified), check.IsClean, check.Corruptions, check.Leaks);
    }

    /// <summary>Writes seeded guest RAM: about 40 % random pages, 30 % text-like, 30 % zero (left as holes).</summary>
    private static long MakeGuestRam(string path, long bytes, int seed)
    {
        var random = new Random(seed);
        byte[] text = MakeText(random, 1 << 20);
        const int chunkPages = 256;
        byte[] chunk = new byte[chunkPages * PageSize];
        long zero = 0;
        using var file = new FileStream(path, FileMode.CreateNew, FileAccess.Write, FileShare.None, 0);
        file.SetLength(bytes);
        for (long offset = 0; offset < bytes; offset += chunk.Length)
        {
            int pages = (int)Math.Min(chunkPages, (bytes - offset) / PageSize);
            Array.Clear(chunk);
            bool any = false;
            for (int p = 0; p < pages; p++)
            {
                Span<byte> page = chunk.AsSpan(p * PageSize, PageSize);
                int kind = random.Next(10);
                if (kind < 3) { zero++; continue; }
                any = true;
                if (kind < 7) { random.NextBytes(page); page[0] |= 1; }
                else text.AsSpan(random.Next(text.Length - PageSize), PageSize).CopyTo(page);
            }
            if (any)
            {
                file.Position = offset;
                file.Write(chunk, 0, pages * PageSize);
            }
        }
        return zero;
    }

    /// <summary>Text-like bytes: words of common letters separated by runs of spaces (pages are cut from it).</summary>
    private static byte[] MakeText(Random random, int length)
    {
        ReadOnlySpan<byte> letters = "etaoinshrdlucmfwypvbgkjqxz"u8;
        byte[] text = new byte[length];
        int i = 0;
        while (i < length)
        {
            int word = random.Next(1, 12);
            for (int k = 0; k < word && i < length; k++) text[i++] = letters[random.Next(letters.Length)];
            int spaces = random.Next(3) == 0 ? random.Next(1, 40) : 1;
            for (int k = 0; k < spaces && i < length; k++) text[i++] = (byte)' ';
        }
        return text;
    }

    private static UInt128 Hash(string path)
    {
        var hash = new XxHash128();
        using var f = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 20);
        hash.Append(f);
        return hash.GetCurrentHashAsUInt128();
    }
}
