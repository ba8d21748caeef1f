using System.CommandLine;
using System.Text.Json.Serialization;
using Microsoft.Win32.SafeHandles;
using Vmsnap.Migration;
using Vmsnap.Snapshots;
using Vmsnap.Storage;
using Vmsnap.VmState;
using Vmsnap.VmState.LowLevel;

namespace Vmsnap.Cli.Commands;

/// <summary>The VM commands: save, load, export, import, inspect.</summary>
internal static class VmCommands
{
    internal static IEnumerable<CommandFactory> Build() =>
    [
        new("save", SaveCommand),
        new("load", LoadCommand),
        new("export", ExportCommand),
        new("import", ImportCommand),
        new("inspect", InspectCommand),
    ];

    private static Option<string[]> RamOption(string description) => new("--ram")
    {
        Description = description,
        Arity = ArgumentArity.OneOrMore,
        AllowMultipleArgumentsPerToken = false,
    };

    /// <summary>Parses <c>ID=FILE</c> pairs; a block may be named once.</summary>
    internal static List<KeyValuePair<string, string>> ParseRam(string[]? values)
    {
        var pairs = new List<KeyValuePair<string, string>>();
        foreach (string v in values ?? [])
        {
            int eq = v.IndexOf('=');
            if (eq <= 0 || eq == v.Length - 1) throw new ArgumentException($"--ram takes ID=FILE (a RAM block's id and a file), not '{v}'");
            string id = v[..eq];
            if (pairs.Any(p => p.Key == id)) throw new ArgumentException($"RAM block '{id}' is given twice with --ram");
            pairs.Add(new(id, v[(eq + 1)..]));
        }
        return pairs;
    }

    private static Option<string?> ModeOption()
    {
        var o = new Option<string?>("--mode") { Description = "VM-state writer mode: buffered (default for images) or gather" };
        o.AcceptOnlyFromAmong("buffered", "gather");
        return o;
    }

    private sealed record WriterOptionSet(Option<string?> Mode, Option<int?> Buffers, Option<string?> BufferSize, Option<bool> NoDirect)
    {
        internal static WriterOptionSet Create() => new(
            ModeOption(),
            new Option<int?>("--buffers") { Description = "Buffers in flight in buffered mode (K)" },
            new Option<string?>("--buffer-size") { Description = "Size of each buffer in buffered mode (B), e.g. 1M" },
            new Option<bool>("--no-direct") { Description = "Go through the page cache instead of O_DIRECT" });

        internal void AddTo(Command c)
        {
            c.Options.Add(Mode);
            c.Options.Add(Buffers);
            c.Options.Add(BufferSize);
            c.Options.Add(NoDirect);
        }

        internal VmSnapshotOptions Read(ParseResult p) => new()
        {
            Mode = p.GetValue(Mode) switch { "gather" => VmStateWriteMode.Gather, "buffered" => VmStateWriteMode.Buffered, _ => null },
            BufferCount = p.GetValue(Buffers),
            BufferSize = p.GetValue(BufferSize) is { } s ? Cli.ParseInt32Size(s) : null,
            Direct = !p.GetValue(NoDirect),
        };
    }

    private static Command SaveCommand()
    {
        var image = new Argument<string>("IMAGE") { Description = "The qcow2 image that receives the snapshot" };
        var name = new Option<string>("--name") { Description = "Name (TAG) of the new snapshot", Required = true };
        var machine = new Option<string?>("--machine") { Description = "Machine type of the guest (e.g. none); RAM blocks come from --ram" };
        var template = new Option<string?>("--template") { Description = "A migration stream whose machine, RAM blocks and device state are reused; --ram replaces blocks" };
        var ram = RamOption("A RAM block and the file holding it: ID=FILE (repeatable)");
        var qemuVersion = new Option<string?>("--qemu-version")
        {
            Description = "With --machine: the QEMU the stream is for, e.g. 7.2 (default: current QEMU, 8.2 or later); it sets the VM description's shape",
        };
        var writer = WriterOptionSet.Create();
        var json = Cli.JsonOption();
        var command = new Command("save", "Save a VM (RAM from files) as a qcow2 internal snapshot QEMU can -loadvm") { image, name, machine, template, ram, qemuVersion, json };
        writer.AddTo(command);
        command.SetHandler((p, ct) =>
        {
            string? machineType = p.GetValue(machine), templatePath = p.GetValue(template);
            if ((machineType is null) == (templatePath is null)) throw new ArgumentException("give either --machine TYPE or --template STREAM");
            var ramFiles = ParseRam(p.GetValue(ram));
            if (machineType is not null && ramFiles.Count == 0) throw new ArgumentException("--machine needs at least one --ram ID=FILE");
            Version? target = null;
            if (p.GetValue(qemuVersion) is { } v)
            {
                if (machineType is null) throw new ArgumentException("--qemu-version goes with --machine (a template's stream already is what its QEMU wrote)");
                if (!Version.TryParse(v, out target) || target.Major < 1) throw new ArgumentException($"--qemu-version takes a QEMU version such as 7.2 or 10.0, not '{v}'");
            }
            string imagePath = p.GetValue(image)!;
            using MachineProfile profile = machineType is not null
                ? MachineProfile.Create(machineType, ramFiles, target)
                : MachineProfile.FromTemplate(templatePath!, ramFiles, Path.GetDirectoryName(Path.GetFullPath(imagePath)), ct);
            bool asJson = p.GetValue(json);
            VmSnapshotResult result;
            using (var progress = ProgressLine.Start("saving", profile.RamBlocks.Sum(b => b.Length), asJson))
                result = VmSnapshots.Save(imagePath, p.GetValue(name)!, profile, writer.Read(p), progress, ct);
            Report(result, "saved", asJson);
            return Cli.ExitOk;
        });
        return command;
    }

    private static Command LoadCommand()
    {
        var image = new Argument<string>("IMAGE|STREAM") { Description = "The qcow2 image, or a migration stream file (plain or QEMU's mapped-ram file: format)" };
        var tag = new Argument<string?>("TAG") { Description = "The snapshot's ID or name (when the first argument is an image)", Arity = ArgumentArity.ZeroOrOne };
        var ram = RamOption("Where to write a RAM block: ID=FILE (repeatable; created if missing, sparse where pages are zero)");
        ram.Required = true;
        var forceShare = SnapshotCommands.ForceShareOption();
        var noDirect = new Option<bool>("--no-direct") { Description = "Go through the page cache instead of O_DIRECT" };
        var inPlace = new Option<bool>("--in-place")
        {
            Description = "Write a RAM file that exists with the block's length in place (one a running process maps, e.g. QEMU's " +
                          "memory-backend-file with share=on); a failed load then leaves it partly written. Default: the file is replaced once the load is complete",
        };
        var json = Cli.JsonOption();
        var command = new Command("load", "Load a snapshot's (or a stream file's) RAM into files") { image, tag, ram, forceShare, noDirect, inPlace, json };
        command.SetHandler((p, ct) =>
        {
            bool asJson = p.GetValue(json);
            string path = p.GetValue(image)!;
            string? snapshot = p.GetValue(tag);
            var ramFiles = ParseRam(p.GetValue(ram));
            if (snapshot is null)
            {
                if (IsQcow2(path)) throw new ArgumentException($"'{path}' is a qcow2 image: say which snapshot to load (vmsnap load IMAGE TAG --ram ...)");
                var clock = System.Diagnostics.Stopwatch.StartNew();
                MigrationStreamInfo info;
                using (var progress = ProgressLine.Start("loading", 0, asJson))
                    info = VmSnapshots.LoadStream(path, ramFiles, new VmSnapshotOptions { RamInPlace = p.GetValue(inPlace) }, progress, ct);
                ReportStream(path, info, clock.Elapsed.TotalSeconds, asJson);
                return Cli.ExitOk;
            }
            var options = new VmSnapshotOptions { Direct = !p.GetValue(noDirect), ForceShare = p.GetValue(forceShare), RamInPlace = p.GetValue(inPlace) };
            VmSnapshotResult result;
            using (var progress = ProgressLine.Start("loading", 0, asJson))
                result = VmSnapshots.Load(path, snapshot, ramFiles, options, progress, ct);
            Report(result, "loaded", asJson);
            return Cli.ExitOk;
        });
        return command;
    }

    private static Command ExportCommand()
    {
        var image = new Argument<string>("IMAGE") { Description = "The qcow2 image" };
        var tag = new Argument<string>("TAG") { Description = "The snapshot's ID or name" };
        // Not --output: that is the output format on every command, as in qemu-img.
        var output = new Option<string>("--to", "-o") { Description = "The migration stream to write ('-' for stdout)", Required = true };
        var mappedRam = new Option<bool>("--mapped-ram")
        {
            Description = "Write a mapped-ram file for QEMU >= 9.0: migrate-set-capabilities mapped-ram (and multifd, direct-io if wanted), then migrate-incoming file:FILE",
        };
        var forceShare = SnapshotCommands.ForceShareOption();
        var writer = WriterOptionSet.Create();
        var json = Cli.JsonOption();
        var command = new Command("export", "Write a snapshot's VM state as a migration stream (QEMU: -incoming \"exec:cat STREAM\")") { image, tag, output, mappedRam, forceShare, json };
        writer.AddTo(command);
        command.SetHandler((p, ct) =>
        {
            string destination = p.GetValue(output)!;
            bool toStdout = destination == "-";
            bool asJson = p.GetValue(json);
            if (toStdout && asJson) throw new ArgumentException("--json cannot share stdout with '-o -'");
            if (toStdout && p.GetValue(mappedRam)) throw new ArgumentException("--mapped-ram writes a file laid out by offset: give -o FILE, not '-'");
            var options = writer.Read(p) with { ForceShare = p.GetValue(forceShare), MappedRam = p.GetValue(mappedRam) };
            VmSnapshotResult result;
            using (var progress = ProgressLine.Start("exporting", 0, asJson))
            {
                if (toStdout)
                {
                    using Stream stdout = Console.OpenStandardOutput();
                    result = VmSnapshots.Export(p.GetValue(image)!, p.GetValue(tag)!, stdout, options, progress, ct);
                }
                else
                {
                    result = VmSnapshots.Export(p.GetValue(image)!, p.GetValue(tag)!, destination, options, progress, ct);
                }
            }
            if (toStdout) Console.Error.WriteLine(Summary(result, "exported"));
            else Report(result, "exported", asJson);
            return Cli.ExitOk;
        });
        return command;
    }

    private static Command ImportCommand()
    {
        var stream = new Argument<string>("STREAM") { Description = "A migration stream, e.g. from QEMU's migrate \"exec:cat > STREAM\" ('-' for stdin)" };
        var image = new Argument<string>("IMAGE") { Description = "The qcow2 image that receives the snapshot" };
        var name = new Option<string>("--name") { Description = "Name (TAG) of the new snapshot", Required = true };
        var writer = WriterOptionSet.Create();
        var json = Cli.JsonOption();
        var command = new Command("import", "Make a snapshot QEMU can -loadvm from a migration stream") { stream, image, name, json };
        writer.AddTo(command);
        command.SetHandler((p, ct) =>
        {
            string source = p.GetValue(stream)!;
            bool asJson = p.GetValue(json);
            VmSnapshotResult result;
            using (var progress = ProgressLine.Start("importing", 0, asJson))
            {
                if (source == "-")
                {
                    using Stream stdin = StandardInput(ct);
                    result = VmSnapshots.Import(stdin, p.GetValue(image)!, p.GetValue(name)!, writer.Read(p), progress, ct);
                }
                else
                {
                    result = VmSnapshots.Import(source, p.GetValue(image)!, p.GetValue(name)!, writer.Read(p), progress, ct);
                }
            }
            Report(result, "imported", asJson);
            return Cli.ExitOk;
        });
        return command;
    }

    private static Command InspectCommand()
    {
        var target = new Argument<string>("STREAM|IMAGE") { Description = "A migration stream ('-' for stdin), or a qcow2 image followed by a snapshot TAG" };
        var tag = new Argument<string?>("TAG") { Description = "The snapshot's ID or name (when the first argument is an image)", Arity = ArgumentArity.ZeroOrOne };
        var forceShare = SnapshotCommands.ForceShareOption();
        var json = Cli.JsonOption();
        var command = new Command("inspect", "Show what a VM state holds: machine, sections, RAM blocks, devices") { target, tag, forceShare, json };
        command.SetHandler((p, ct) =>
        {
            string path = p.GetValue(target)!;
            string? snapshot = p.GetValue(tag);
            MigrationStreamInfo info;
            object? where = null;
            if (snapshot is not null)
            {
                var r = VmSnapshots.Inspect(path, snapshot, new VmSnapshotOptions { ForceShare = p.GetValue(forceShare) }, ct);
                info = r.Stream;
                where = new InspectedSnapshotJson(path, r.Snapshot, r.HasPostcopyIndex ? "recorded" : "none");
                if (!p.GetValue(json)) Console.Out.WriteLine($"postcopy index: {(r.HasPostcopyIndex ? "recorded at save time" : "none (loadvm --postcopy scans the snapshot)")}");
            }
            else if (path == "-")
            {
                using Stream stdin = StandardInput(ct);
                info = VmSnapshots.InspectStream(stdin, ct);
            }
            else
            {
                if (IsQcow2(path)) throw new ArgumentException($"'{path}' is a qcow2 image: say which snapshot to inspect (vmsnap inspect IMAGE TAG)");
                info = VmSnapshots.InspectStream(path, ct);
            }
            if (p.GetValue(json)) Cli.WriteJson(new InspectJson(where ?? path, info), CliJson.Default.InspectJson);
            else PrintInspection(info);
            return Cli.ExitOk;
        });
        return command;
    }

    /// <summary>The first four bytes of every qcow2 image: "QFI" and 0xfb.</summary>
    private const uint Qcow2Magic = 0x514649fb;

    private static bool IsQcow2(string path)
    {
        Span<byte> magic = stackalloc byte[4];
        using var f = File.OpenRead(path);
        return f.Read(magic) == 4 && System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(magic) == Qcow2Magic;
    }

    private static string Summary(VmSnapshotResult r, string verb) =>
        $"{verb} snapshot '{r.Snapshot.Name}' (ID {r.Snapshot.Id}) of {r.Image}: {Cli.FormatSize(r.VmStateBytes)} of VM state " +
        $"({Cli.FormatSize(r.RamBytes)} RAM) in {r.Seconds:0.000} s, {r.MiBPerSecond:0} MiB/s" + (r.Mode is { } m ? $", {m.ToString().ToLowerInvariant()} mode" : "");

    private static void Report(VmSnapshotResult r, string verb, bool asJson)
    {
        if (!asJson)
        {
            Console.Out.WriteLine(Summary(r, verb));
            return;
        }
        Cli.WriteJson(new ResultJson(verb, r.Image, r.Snapshot, r.VmStateBytes, r.RamBytes, r.Seconds, r.MiBPerSecond, r.Mode,
            r.Stream.Pages, r.Stream.ZeroPages, r.Stream.MachineType, r.Stream.RamBlocks), CliJson.Default.ResultJson);
    }

    /// <summary>
    /// JSON of save, load, export and import: the image (filename, as qemu-img names it), the snapshot,
    /// how much VM state (vm-state-size, as in a snapshot's entry) and RAM moved, how fast.
    /// </summary>
    internal sealed record ResultJson(
        string Operation, string Filename, VmSnapshotId Snapshot, long VmStateSize, long RamSize, double Seconds,
        [property: JsonPropertyName("mib-per-second")] double MiBPerSecond, VmStateWriteMode? Mode,
        long Pages, long ZeroPages, string? Machine, IReadOnlyList<RamBlockSummary> RamBlocks);

    /// <summary>JSON of inspect: where the VM state came from (a stream's path, or an image and snapshot) and what it holds.</summary>
    internal sealed record InspectJson(object Source, MigrationStreamInfo Stream);

    /// <summary>The source of <c>inspect IMAGE TAG</c>.</summary>
    internal sealed record InspectedSnapshotJson(string Filename, VmSnapshotId Snapshot, string PostcopyIndex);

    private static void ReportStream(string path, MigrationStreamInfo info, double seconds, bool asJson)
    {
        if (!asJson)
        {
            Console.Out.WriteLine($"loaded {path}: {Cli.FormatSize(info.RamBytes)} RAM from {Cli.FormatSize(info.TotalBytes)} of stream in {seconds:0.000} s" +
                (info.IsMappedRam ? " (mapped-ram)" : ""));
            return;
        }
        Cli.WriteJson(new StreamLoadJson("loaded", path, info.TotalBytes, info.RamBytes, seconds, info.Pages, info.ZeroPages,
            info.MachineType, info.Capabilities, info.RamBlocks), CliJson.Default.StreamLoadJson);
    }

    /// <summary>JSON of <c>load STREAM</c> (a stream file rather than an image's snapshot); every key is there, machine as null when the stream names none.</summary>
    internal sealed record StreamLoadJson(
        string Operation, string Stream, long StreamSize, long RamSize, double Seconds, long Pages, long ZeroPages,
        [property: JsonIgnore(Condition = JsonIgnoreCondition.Never)] string? Machine,
        IReadOnlyList<string> Capabilities, IReadOnlyList<RamBlockSummary> RamBlocks);

    private static void PrintInspection(MigrationStreamInfo info)
    {
        var o = Console.Out;
        o.WriteLine($"machine: {info.MachineType ?? "(none given)"}");
        o.WriteLine($"capabilities: {(info.Capabilities.Count == 0 ? "(none)" : string.Join(", ", info.Capabilities))}");
        o.WriteLine($"stream size: {Cli.FormatSize(info.TotalBytes)} ({info.TotalBytes} bytes), device state {Cli.FormatSize(info.DeviceStateBytes)}");
        o.WriteLine();
        o.WriteLine("RAM blocks:");
        o.WriteLine($"  {"ID",-28} {"LENGTH",12} {"PAGES",10} {"ZERO PAGES",10}");
        foreach (var b in info.RamBlocks)
            o.WriteLine($"  {b.Id,-28} {Cli.FormatSize(b.Length),12} {b.Pages,10} {b.ZeroPages,10}" +
                (b.PagesOffset is long at ? $"  pages at {at}, bitmap at {b.BitmapOffset}" : ""));
        o.WriteLine();
        o.WriteLine("Sections:");
        o.WriteLine($"  {"ID",4} {"KIND",-14} {"NAME",-28} {"INSTANCE",8} {"VERSION",7} {"RECORDS",7} {"BYTES",12}");
        foreach (var s in info.Sections)
            o.WriteLine($"  {s.Id,4} {s.Kind,-14} {s.Name,-28} {s.Instance,8} {s.Version,7} {s.Count,7} {s.Bytes,12}");
        o.WriteLine();
        o.WriteLine($"Devices ({info.Devices.Count}, from the VM description):");
        foreach (var d in info.Devices)
            o.WriteLine($"  {d.Name} (instance {d.Instance}, version {d.Version}): {d.Fields.Count} fields, {d.FieldBytes} bytes");
        if (info.DeviceStateProblem is not null) o.WriteLine($"note: {info.DeviceStateProblem}");
    }

    /// <summary>
    /// Standard input for '-'. Not Console.OpenStandardInput: its reads block past Ctrl-C while a
    /// stalled writer sends nothing, so the cleanup a cancel needs would never run.
    /// </summary>
    private static Stream StandardInput(CancellationToken ct) =>
        new CancellableInputStream(new SafeFileHandle(0, ownsHandle: false), "standard input", ct);
}
