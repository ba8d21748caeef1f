using System.CommandLine;
using Vmsnap.Live;
using Vmsnap.Live.Libvirt;

namespace Vmsnap.Cli.Commands;

/// <summary>The live commands: savevm and loadvm of a running QEMU over its QMP socket, and recover after a killed save.</summary>
internal static class LiveCommands
{
    internal static IEnumerable<CommandFactory> Build() => [new("savevm", SaveVmCommand), new("loadvm", LoadVmCommand), new("recover", RecoverCommand)];

    private static Option<string> QmpOption(bool orDomain = false) => new("--qmp")
    {
        Description = "QEMU's QMP Unix socket (QEMU: -qmp unix:PATH,server=on,wait=off; one client at a time)" + (orDomain ? "; or --domain" : ""),
        Required = !orDomain,
    };

    private static Option<string?> DomainOption() => new("--domain") { Description = "A libvirt domain instead of a QMP socket (through libvirt's own monitor; see docs/libvirt.md)" };

    private static Option<string?> ConnectOption() => new("--connect", "-c") { Description = "libvirt's URI with --domain; default as virsh's (LIBVIRT_DEFAULT_URI, else qemu:///system for root)" };

    /// <summary>The QMP socket or the libvirt domain, exactly one of them.</summary>
    private static (string? Socket, string? Domain) Target(ParseResult p, Option<string> qmp, Option<string?> domain)
    {
        (string? socket, string? name) = (p.GetValue(qmp), p.GetValue(domain));
        if ((socket is null) == (name is null))
            throw new OperationRefusedException("say which QEMU: --qmp SOCKET or --domain NAME (one of them)");
        return (socket, name);
    }

    private static Command SaveVmCommand()
    {
        var qmp = QmpOption(orDomain: true);
        var domain = DomainOption();
        var connect = ConnectOption();
        var tag = new Argument<string>("TAG") { Description = "Name of the snapshot every writable qcow2 drive gets" };
        var live = new Option<bool>("--live") { Description = "Keep the guest running while its RAM is saved; it stops only for the final switchover" };
        var vmStateDisk = new Option<string?>("--vmstate-disk") { Description = "The drive that keeps the VM state (drive name, node name or device id); default: the first writable qcow2 drive" };
        var maxBandwidth = new Option<string?>("--max-bandwidth") { Description = "Limit how fast the VM state is written, in bytes per second (e.g. 200M); default: no limit" };
        var noDirect = new Option<bool>("--no-direct") { Description = "Write the VM state through the page cache instead of O_DIRECT" };
        var json = Cli.JsonOption();
        var command = new Command("savevm", "Save a running QEMU's VM as an internal snapshot of its qcow2 drives (QEMU's savevm, at disk speed)")
        {
            qmp, domain, connect, tag, live, vmStateDisk, maxBandwidth, noDirect, json,
        };
        command.SetHandler((p, ct) =>
        {
            bool asJson = p.GetValue(json);
            var options = new LiveSaveOptions
            {
                Live = p.GetValue(live),
                VmStateDisk = p.GetValue(vmStateDisk),
                MaxBandwidth = p.GetValue(maxBandwidth) is { } b ? Cli.ParseSize(b) : 0,
                Direct = !p.GetValue(noDirect),
                Recovered = Note,
            };
            LiveSaveResult r;
            using (var progress = ProgressLine.Start("saving", 0, asJson))
            {
                (string? socket, string? name) = Target(p, qmp, domain);
                r = Run(() => name is not null
                    ? LibvirtSnapshots.SaveVm(name, p.GetValue(tag)!, p.GetValue(connect), options, progress, ct)
                    : LiveSnapshots.SaveVm(socket!, p.GetValue(tag)!, options, progress, ct), socket, name);
            }
            if (asJson)
            {
                Cli.WriteJson(new SaveVmJson(
                    Operation: "savevm",
                    r.Tag,
                    r.Live,
                    Seconds: Math.Round(r.Seconds, 6),
                    DowntimeSeconds: r.DowntimeSeconds is double d ? Math.Round(d, 6) : null,
                    r.QemuDowntimeSeconds,
                    Bytes: r.VmStateBytes,
                    r.RamBytes,
                    MibPerSecond: Math.Round(r.MiBPerSecond, 1),
                    VmClockNsec: r.VmClockNanoseconds,
                    Date: r.Date.ToUnixTimeMilliseconds() / 1000.0,
                    r.RunState,
                    r.Disks,
                    Machine: r.Stream.MachineType), CliJsonWithNulls.Default.SaveVmJson);
            }
            else
            {
                string down = r.DowntimeSeconds is double d ? $", guest stopped {d:0.000} s" : "";
                Console.Out.WriteLine($"saved snapshot '{r.Tag}'{(r.Live ? " (live)" : "")} on {string.Join(", ", r.Disks.Select(x => $"{x.Drive} (ID {x.SnapshotId})"))}: " +
                    $"{Cli.FormatSize(r.VmStateBytes)} of VM state ({Cli.FormatSize(r.RamBytes)} RAM) in {r.Seconds:0.000} s, {r.MiBPerSecond:0} MiB/s{down}; guest {r.RunState}");
            }
            return Cli.ExitOk;
        });
        return command;
    }

    private static Command LoadVmCommand()
    {
        var qmp = QmpOption(orDomain: true);
        var domain = DomainOption();
        var connect = ConnectOption();
        var force = new Option<bool>("--force") { Description = "With --domain: stop a running domain at once (virsh destroy) instead of refusing" };
        var tag = new Argument<string>("TAG") { Description = "The snapshot's ID or name" };
        var vmStateDisk = new Option<string?>("--vmstate-disk") { Description = "The drive whose snapshot holds the VM state; default: the first writable qcow2 drive" };
        var postcopy = new Option<bool>("--postcopy")
        {
            Description = "Postcopy: the device state first, so the guest runs at once, then every page, those it touches first (QEMU's postcopy-ram, needs userfaultfd); " +
                "with --domain, libvirt takes the domain in as an incoming migration from vmsnap",
        };
        var json = Cli.JsonOption();
        var command = new Command("loadvm", "Load a snapshot into a QEMU started with -incoming defer: revert its qcow2 drives, feed it the VM state")
        {
            qmp, domain, connect, force, tag, vmStateDisk, postcopy, json,
        };
        command.SetHandler((p, ct) =>
        {
            bool asJson = p.GetValue(json);
            if (Target(p, qmp, domain).Domain is { } name)
            {
                return LoadDomain(name, p.GetValue(tag)!, p.GetValue(connect), p.GetValue(force), p.GetValue(postcopy), asJson, ct);
            }
            LiveLoadResult r;
            bool isPostcopy = p.GetValue(postcopy);
            using (var progress = ProgressLine.Start(isPostcopy ? "pages delivered" : "loading", 0, asJson))
                r = Run(() => LiveSnapshots.LoadVm(p.GetValue(qmp)!, p.GetValue(tag)!,
                    new LiveLoadOptions { VmStateDisk = p.GetValue(vmStateDisk), Recovered = Note, Postcopy = isPostcopy, ServingPages = HoldSignals }, progress, ct), p.GetValue(qmp)!);
            LivePostcopyResult? pc = r.Postcopy;
            if (pc is not null && Termination.Current is { Signal: > 0 } signalled)
                Console.Error.WriteLine($"vmsnap: {signalled.SignalName} received during the postcopy load: finished sending every page first; the guest runs");
            if (asJson)
            {
                Cli.WriteJson(new LoadVmJson(
                    Operation: "loadvm",
                    r.Tag,
                    Seconds: Math.Round(r.Seconds, 6),
                    Bytes: r.VmStateBytes,
                    r.RamBytes,
                    MibPerSecond: Math.Round(r.MiBPerSecond, 1),
                    r.RunState,
                    r.Disks,
                    Machine: r.Stream.MachineType,
                    Postcopy: pc is null ? null : PostcopyJson.Of(pc)),
                    CliJsonWithNulls.Default.LoadVmJson);
            }
            else if (pc is { Resumed: true })
            {
                Console.Out.WriteLine($"resumed the postcopy load of snapshot '{r.Tag}' that was cut off (no drive reverted again): {pc.PagesAlreadyThere} pages were in QEMU already; " +
                    $"last page after {pc.SecondsToLastPage:0.000} s ({pc.PagesOnDemand} pages on demand, {pc.PagesStreamed} streamed; " +
                    $"{pc.ScanSeconds:0.000} s to {(pc.Index == "recorded" ? "read its recorded index" : "index the snapshot")}); guest {r.RunState}");
                NoteIndexProblem(pc);
            }
            else if (pc is not null)
            {
                string resumed = pc.SecondsToResume is double t ? $"guest ran after {t:0.000} s" : "guest left paused (-S)";
                Console.Out.WriteLine($"loaded snapshot '{r.Tag}' with postcopy from {string.Join(", ", r.Disks.Select(x => $"{x.Drive} (ID {x.SnapshotId})"))}: " +
                    $"{resumed}, last page after {pc.SecondsToLastPage:0.000} s ({pc.PagesOnDemand} pages on demand, {pc.PagesStreamed} streamed; " +
                    $"{pc.ScanSeconds:0.000} s to {(pc.Index == "recorded" ? "read its recorded index" : "index the snapshot")}); guest {r.RunState}");
                NoteIndexProblem(pc);
            }
            else
            {
                Console.Out.WriteLine($"loaded snapshot '{r.Tag}' from {string.Join(", ", r.Disks.Select(x => $"{x.Drive} (ID {x.SnapshotId})"))}: " +
                    $"{Cli.FormatSize(r.VmStateBytes)} of VM state in {r.Seconds:0.000} s, {r.MiBPerSecond:0} MiB/s; guest {r.RunState}");
            }
            return Cli.ExitOk;
        });
        return command;
    }

    /// <summary>While a postcopy load serves the guest's pages, SIGINT and SIGTERM wait for the last page.</summary>
    private static void HoldSignals(bool serving)
    {
        if (Termination.Current is not { } t) return;
        if (!serving)
        {
            t.Release();
            return;
        }
        t.Hold("the guest runs on pages vmsnap is still sending: finishing that first (the load then ends normally)",
            "stopping now would leave the guest paused (QEMU's postcopy-paused) until its missing pages come; vmsnap is finishing " +
            "the load instead (SIGKILL stops it anyway, with that cost)");
    }

    /// <summary>loadvm --domain: the domain reverted to the snapshot and restored by libvirt (or, --postcopy, migrated in from vmsnap).</summary>
    private static int LoadDomain(string name, string tag, string? connect, bool force, bool postcopy, bool asJson, CancellationToken ct)
    {
        LibvirtLoadResult r;
        using (var progress = ProgressLine.Start(postcopy ? "delivered" : "loading", 0, asJson))
            r = Run(() => LibvirtSnapshots.LoadVm(name, tag, connect, force, progress, ct, postcopy), null, name);
        LivePostcopyResult? pc = r.Postcopy;
        if (r.PostcopyNote is { } note) Console.Error.WriteLine($"vmsnap: {note}");
        if (asJson)
        {
            Cli.WriteJson(new DomainLoadVmJson("loadvm", name, r.Tag, Math.Round(r.Seconds, 6), r.VmStateBytes, r.RunState, r.Disks,
                pc is null ? null : PostcopyJson.Of(pc),
                r.PostcopyNote), CliJsonWithNulls.Default.DomainLoadVmJson);
        }
        else if (pc is not null)
        {
            Console.Out.WriteLine($"loaded snapshot '{r.Tag}' into domain '{name}' with postcopy from {string.Join(", ", r.Disks.Select(x => $"{x.Drive} (ID {x.SnapshotId})"))}: " +
                $"domain running after {pc.SecondsToResume:0.000} s, last page after {pc.SecondsToLastPage:0.000} s ({pc.PagesOnDemand} pages on demand, {pc.PagesStreamed} streamed); " +
                $"domain {r.RunState}");
            NoteIndexProblem(pc);
        }
        else
        {
            Console.Out.WriteLine($"loaded snapshot '{r.Tag}' into domain '{name}' from {string.Join(", ", r.Disks.Select(x => $"{x.Drive} (ID {x.SnapshotId})"))}: " +
                $"{Cli.FormatSize(r.VmStateBytes)} of VM state in {r.Seconds:0.000} s; domain {r.RunState}");
        }
        return Cli.ExitOk;
    }

    /// <summary>JSON of <c>loadvm --domain --json</c>: <c>postcopy</c> is null when the domain was restored whole, and <c>postcopy-note</c> says why when --postcopy was asked.</summary>
    internal sealed record DomainLoadVmJson(string Operation, string Domain, string Tag, double Seconds, long Bytes, string RunState, IReadOnlyList<LiveDiskSnapshot> Disks,
        PostcopyJson? Postcopy, string? PostcopyNote);

    /// <summary>JSON of <c>savevm --json</c>: every key is there, null when it does not apply.</summary>
    internal sealed record SaveVmJson(string Operation, string Tag, bool Live, double Seconds, double? DowntimeSeconds, double? QemuDowntimeSeconds,
        long Bytes, long RamBytes, double MibPerSecond, long VmClockNsec, double Date, string RunState, IReadOnlyList<LiveDiskSnapshot> Disks, string? Machine);

    /// <summary>JSON of <c>loadvm --json</c>.</summary>
    internal sealed record LoadVmJson(string Operation, string Tag, double Seconds, long Bytes, long RamBytes, double MibPerSecond,
        string RunState, IReadOnlyList<LiveDiskSnapshot> Disks, string? Machine, PostcopyJson? Postcopy);

    /// <summary>The <c>postcopy</c> object of <c>loadvm --postcopy --json</c> (null without --postcopy).</summary>
    internal sealed record PostcopyJson(double? SecondsToResume, double SecondsToLastPage, long PagesOnDemand, long PagesStreamed, double IndexSeconds,
        string Index, string? IndexProblem, bool Resumed, long PagesAlreadyThere)
    {
        internal static PostcopyJson Of(LivePostcopyResult pc) => new(pc.SecondsToResume is double resumed ? Math.Round(resumed, 6) : null,
            Math.Round(pc.SecondsToLastPage, 6), pc.PagesOnDemand, pc.PagesStreamed, Math.Round(pc.ScanSeconds, 6), pc.Index, pc.IndexProblem,
            pc.Resumed, pc.PagesAlreadyThere);
    }

    /// <summary>Says on stderr when a postcopy load scanned the snapshot because its recorded index was not usable.</summary>
    private static void NoteIndexProblem(LivePostcopyResult pc)
    {
        if (pc.IndexProblem is { } why) Console.Error.WriteLine($"vmsnap: the snapshot's recorded postcopy index was not used ({why}); it was scanned instead");
    }

    /// <summary>JSON of <c>recover --json</c>.</summary>
    internal sealed record RecoverJson(string Operation, bool Found, string? Tag, int? ProcessId, string Stage, string Snapshot, bool Resumed,
        IReadOnlyList<string> RestoredSettings, IReadOnlyList<string> KeptSettings, IReadOnlyList<string> Actions, string RunState, string Description);

    private static Command RecoverCommand()
    {
        var qmp = QmpOption(orDomain: true);
        var domain = DomainOption();
        var connect = ConnectOption();
        var json = Cli.JsonOption();
        var command = new Command("recover", "Undo what a killed live save left in a running QEMU: its migration settings, a stopped guest, a half-made snapshot " +
            "(savevm and loadvm do this first on their own); with --domain, also record in libvirt a snapshot the save completed on every disk")
        {
            qmp, domain, connect, json,
        };
        command.SetHandler((p, ct) =>
        {
            (string? socket, string? name) = Target(p, qmp, domain);
            LiveRecoveryResult r = Run(() => name is not null
                ? LibvirtSnapshots.Recover(name, p.GetValue(connect), ct)
                : LiveSnapshots.Recover(socket!, ct), socket, name);
            if (p.GetValue(json))
            {
                Cli.WriteJson(new RecoverJson("recover", r.Found, r.Tag, r.ProcessId, r.Stage, r.Snapshot, r.Resumed,
                    r.RestoredSettings, r.KeptSettings, r.Actions, r.RunState, r.Description), CliJsonWithNulls.Default.RecoverJson);
            }
            else
            {
                Console.Out.WriteLine(r.Found ? $"recovered: {r.Summary}; guest {r.RunState}" : r.Description);
            }
            return Cli.ExitOk;
        });
        return command;
    }

    /// <summary>Says on stderr what a save or load undid first of an earlier, killed save (the command's own output stays as it is).</summary>
    private static void Note(LiveRecoveryResult r)
    {
        if (r.Actions.Count > 0) Console.Error.WriteLine($"vmsnap: recovered first: {r.Summary}");
    }

    /// <summary>
    /// A cancelled live operation says what it did about it (the command's own handler would print only "cancelled"),
    /// and a failure that left the save's record in QEMU says how to finish the job once its cause is fixed.
    /// </summary>
    /// <param name="qmpSocket">The QMP socket <c>vmsnap recover</c> would take, or null.</param>
    /// <param name="domain">The libvirt domain <c>vmsnap recover --domain</c> would take, or null.</param>
    private static T Run<T>(Func<T> operation, string? qmpSocket, string? domain = null)
    {
        string recover = qmpSocket is not null ? $"vmsnap recover --qmp {qmpSocket}" : $"vmsnap recover --domain {domain}";
        try
        {
            return operation();
        }
        catch (OperationCanceledException e) when (e.InnerException is LiveSnapshotException undone)
        {
            throw WithHint(undone, recover);
        }
        catch (LiveSnapshotException e) when (e.RecoveryPending)
        {
            throw WithHint(e, recover);
        }
    }

    /// <summary>The error as the command line words it: what vmsnap recover does for it, when it can.</summary>
    private static LiveSnapshotException WithHint(LiveSnapshotException e, string recover) =>
        !e.RecoveryPending ? new LiveSnapshotException(e.Message, e)
        : e.ResumeProblem is not null ? new LiveSnapshotException($"{e.Message} ({recover} resumes it once that is fixed)", e)
        : new LiveSnapshotException($"{e.Message}; run '{recover}' once that is fixed", e);
}
