using Vmsnap.Live.Qmp;
using Vmsnap.Migration;

namespace Vmsnap.Live;

/// <summary>
/// QEMU's savevm and loadvm for a running QEMU process, driven over its QMP socket: the VM state
/// comes out of (or goes into) QEMU through a migration channel vmsnap owns, and goes to disk once,
/// through the buffered writer, into the image that keeps it, while QEMU still holds that image.
/// </summary>
/// <remarks>
/// A save snapshots every writable qcow2 drive with the same tag, like QEMU's savevm, and refuses up
/// front (nothing changed) a writable drive that cannot take a snapshot and a tag already taken. A
/// failure (QEMU's migration failing or cancelled, a disk full or failing, an image QEMU did not
/// release, cancellation, QEMU exiting) leaves no snapshot, no leaked clusters and the older
/// snapshots as they were, and puts the guest back in the run state it had. See docs/live.md.
/// </remarks>
public static class LiveSnapshots
{
    /// <summary>
    /// Saves the VM of the QEMU whose QMP socket is <paramref name="qmpSocket"/> as snapshot
    /// <paramref name="tag"/> of all its writable qcow2 drives (what QEMU's HMP <c>savevm TAG</c> does).
    /// </summary>
    /// <param name="qmpSocket">The QMP Unix socket (QEMU's <c>-qmp unix:PATH,server=on,wait=off</c>; one client at a time).</param>
    /// <param name="tag">The snapshot's name.</param>
    /// <param name="options">Live or stopped, which drive keeps the VM state, I/O settings.</param>
    /// <param name="ramBytesDone">Receives the bytes of RAM saved so far; an <see cref="IRamProgress"/> also gets the guest's RAM size.</param>
    /// <param name="cancellationToken">Stops the save; nothing is left behind and the guest runs again. The save then throws
    /// <see cref="OperationCanceledException"/>, whose <see cref="Exception.InnerException"/> is the <see cref="LiveSnapshotException"/>
    /// that says what was undone.</param>
    /// <exception cref="VmsnapException">The save was refused or failed; the message says why, and nothing was saved:
    /// <see cref="OperationRefusedException"/> or <see cref="Qcow2.SnapshotExistsException"/> up front, <see cref="QmpException"/>
    /// when QEMU refused a command, <see cref="LiveSnapshotException"/> when the save failed part way (its properties say whether
    /// anything was saved and whether the guest runs).</exception>
    public static LiveSaveResult SaveVm(string qmpSocket, string tag, LiveSaveOptions? options = null,
        IProgress<long>? ramBytesDone = null, CancellationToken cancellationToken = default)
    {
        ArgumentException.ThrowIfNullOrEmpty(qmpSocket);
        if (string.IsNullOrEmpty(tag)) throw new OperationRefusedException("a snapshot needs a name (TAG)");
        options ??= new LiveSaveOptions();
        using QmpClient qmp = QmpClient.Connect(qmpSocket, options.CommandTimeout, cancellationToken);
        return new LiveSave(qmp, tag, options, ramBytesDone, cancellationToken).Run();
    }

    /// <summary>
    /// Undoes what a live save killed part way (SIGKILL, a crash) left in the QEMU whose QMP socket is
    /// <paramref name="qmpSocket"/>: QEMU's migration settings as that save set them, a guest it stopped or left in
    /// <c>postmigrate</c> with its images released, a snapshot on some drives only, the unsaved VM state at the end of
    /// the image. <see cref="SaveVm"/> and <see cref="LoadVm"/> do the same first, on their own; this does it alone.
    /// A postcopy load that was cut off (QEMU in <c>postcopy-paused</c>) is resumed from the record it left in QEMU, as
    /// <see cref="LoadVm"/> with the same snapshot and <see cref="LiveLoadOptions.Postcopy"/> would.
    /// </summary>
    /// <returns>What the killed save had left and what was done; <see cref="LiveRecoveryResult.Found"/> is false when there was nothing.</returns>
    /// <exception cref="VmsnapException">The save is still running (<see cref="OperationRefusedException"/>), QEMU refused a command
    /// (<see cref="QmpException"/>), or something could not be undone (<see cref="LiveSnapshotException"/>, saying what was done and what not).</exception>
    public static LiveRecoveryResult Recover(string qmpSocket, CancellationToken cancellationToken = default)
    {
        ArgumentException.ThrowIfNullOrEmpty(qmpSocket);
        using QmpClient qmp = QmpClient.Connect(qmpSocket, QmpClient.DefaultTimeout, cancellationToken);
        return LiveRecovery.Explicit(qmp, cancellationToken);
    }

    /// <summary>
    /// Restores snapshot <paramref name="tag"/> into the QEMU whose QMP socket is <paramref name="qmpSocket"/>,
    /// which must have been started with <c>-incoming defer</c>: every qcow2 drive is reverted to the
    /// snapshot, then the VM state is fed to QEMU's <c>migrate-incoming</c>. The guest then runs, or stays
    /// paused when QEMU was started with <c>-S</c>.
    /// </summary>
    /// <exception cref="VmsnapException">QEMU is not waiting for an incoming migration (<see cref="OperationRefusedException"/>), a drive
    /// lacks the snapshot (<see cref="Qcow2.SnapshotNotFoundException"/>), QEMU refused a command (<see cref="QmpException"/>),
    /// or the load failed part way (<see cref="LiveSnapshotException"/>).</exception>
    public static LiveLoadResult LoadVm(string qmpSocket, string tag, LiveLoadOptions? options = null,
        IProgress<long>? ramBytesDone = null, CancellationToken cancellationToken = default)
    {
        ArgumentException.ThrowIfNullOrEmpty(qmpSocket);
        if (string.IsNullOrEmpty(tag)) throw new OperationRefusedException("say which snapshot to load (TAG)");
        options ??= new LiveLoadOptions();
        using QmpClient qmp = QmpClient.Connect(qmpSocket, options.CommandTimeout, cancellationToken);
        return new LiveLoad(qmp, tag, options, ramBytesDone, cancellationToken).Run();
    }
}

/// <summary>How <see cref="LiveSnapshots.SaveVm"/> saves.</summary>
public sealed record LiveSaveOptions
{
    /// <summary>Keep the guest running while its RAM is sent (pre-copy); it stops only for the final switchover. Default: stopped for the whole save, as QEMU's savevm does.</summary>
    public bool Live { get; init; }

    /// <summary>The drive that keeps the VM state (drive name, node name or device id); null: the first writable qcow2 drive, as QEMU picks it.</summary>
    public string? VmStateDisk { get; init; }

    /// <summary>Write the VM state with O_DIRECT where the file system allows it (default true).</summary>
    public bool Direct { get; init; } = true;

    /// <summary>Limit on how fast the VM state is written, in bytes per second; 0 (the default) for none.</summary>
    public long MaxBandwidth { get; init; }

    /// <summary>How long a QMP command may take.</summary>
    public TimeSpan CommandTimeout { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>How long the migration may send nothing before the save fails.</summary>
    public TimeSpan StallTimeout { get; init; } = TimeSpan.FromSeconds(60);

    /// <summary>Called when the save found and undid what an earlier, killed save left (<see cref="LiveSnapshots.Recover"/>), before it goes on.</summary>
    public Action<LiveRecoveryResult>? Recovered { get; init; }
}

/// <summary>How <see cref="LiveSnapshots.LoadVm"/> loads.</summary>
public sealed record LiveLoadOptions
{
    /// <summary>The drive whose snapshot holds the VM state; null: the first writable qcow2 drive, as QEMU's loadvm picks it.</summary>
    public string? VmStateDisk { get; init; }

    /// <summary>How long a QMP command may take.</summary>
    public TimeSpan CommandTimeout { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>How long QEMU may take to finish loading once the whole VM state was sent.</summary>
    public TimeSpan LoadTimeout { get; init; } = TimeSpan.FromSeconds(120);

    /// <summary>
    /// Postcopy: send the device state first, so QEMU runs the guest at once, then serve every page, those the guest asks
    /// for first (QEMU's <c>postcopy-ram</c>, which this sets on QEMU for the load).
    /// </summary>
    public bool Postcopy { get; init; }

    /// <summary>
    /// Postcopy: called once the guest runs on the pages this process serves (true), and once the last page is sent
    /// (false). Between the two, stopping the process pauses the guest until its pages come: a caller defers signals there.
    /// </summary>
    public Action<bool>? ServingPages { get; init; }

    /// <summary>Called when the load found and undid what an earlier, killed save left (<see cref="LiveSnapshots.Recover"/>), before it goes on.</summary>
    public Action<LiveRecoveryResult>? Recovered { get; init; }
}

/// <summary>A drive's part of a live save or load.</summary>
/// <param name="Drive">The drive's name (or device id, or node name).</param>
/// <param name="Image">Its image file.</param>
/// <param name="SnapshotId">The ID of the snapshot TAG in that image.</param>
/// <param name="VmState">True for the drive that keeps (or gave) the VM state.</param>
public sealed record LiveDiskSnapshot(string Drive, string Image, string SnapshotId, bool VmState);

/// <summary>What a live save did.</summary>
/// <param name="Tag">The snapshot's name.</param>
/// <param name="Live">True when the guest ran while its RAM was sent.</param>
/// <param name="Disks">The drives that got the snapshot.</param>
/// <param name="VmStateBytes">Bytes of VM state written.</param>
/// <param name="RamBytes">Guest RAM in bytes.</param>
/// <param name="Seconds">Wall time of the save, from its first QMP command to the guest running again.</param>
/// <param name="DowntimeSeconds">Seconds the guest's vCPUs were stopped (QEMU's STOP to RESUME events), null when the guest was not running.</param>
/// <param name="QemuDowntimeSeconds">QEMU's own downtime figure for the migration (its part of the stop).</param>
/// <param name="VmClockNanoseconds">The guest clock recorded in the snapshot.</param>
/// <param name="Date">The date recorded in the snapshot (when the guest stopped).</param>
/// <param name="RunState">QEMU's run state afterwards.</param>
/// <param name="Stream">What the VM state holds.</param>
public sealed record LiveSaveResult(string Tag, bool Live, IReadOnlyList<LiveDiskSnapshot> Disks, long VmStateBytes, long RamBytes,
    double Seconds, double? DowntimeSeconds, double? QemuDowntimeSeconds, long VmClockNanoseconds, DateTimeOffset Date, string RunState,
    MigrationStreamInfo Stream)
{
    /// <summary>VM-state bytes per second of the whole save, in MiB/s.</summary>
    public double MiBPerSecond => Seconds > 0 ? VmStateBytes / Seconds / (1 << 20) : 0;

    /// <summary>What the save undid first of an earlier, killed save; null when there was none.</summary>
    public LiveRecoveryResult? Recovery { get; init; }
}

/// <summary>What a live load did.</summary>
/// <param name="Tag">The snapshot's name.</param>
/// <param name="Disks">The drives reverted to the snapshot.</param>
/// <param name="VmStateBytes">Bytes of VM state sent to QEMU.</param>
/// <param name="RamBytes">Guest RAM in bytes.</param>
/// <param name="Seconds">Wall time, from the first QMP command to QEMU having loaded the state.</param>
/// <param name="RunState">QEMU's run state afterwards (<c>running</c>, or <c>paused</c> with <c>-S</c>).</param>
/// <param name="Stream">What the VM state held.</param>
public sealed record LiveLoadResult(string Tag, IReadOnlyList<LiveDiskSnapshot> Disks, long VmStateBytes, long RamBytes, double Seconds,
    string RunState, MigrationStreamInfo Stream)
{
    /// <summary>VM-state bytes per second, in MiB/s.</summary>
    public double MiBPerSecond => Seconds > 0 ? VmStateBytes / Seconds / (1 << 20) : 0;

    /// <summary>What the load undid first of an earlier, killed save; null when there was none.</summary>
    public LiveRecoveryResult? Recovery { get; init; }

    /// <summary>How a postcopy load went; null for a plain load.</summary>
    public LivePostcopyResult? Postcopy { get; init; }
}

/// <summary>How a postcopy load (<see cref="LiveLoadOptions.Postcopy"/>) went; seconds count from the load's first QMP command.</summary>
/// <param name="SecondsToResume">When QEMU started the guest (its RESUME event); null when it did not (started with -S).</param>
/// <param name="SecondsToLastPage">When the last page was sent.</param>
/// <param name="PagesOnDemand">Pages QEMU asked for (the guest touched them) before they were sent.</param>
/// <param name="PagesStreamed">Pages sent in the background.</param>
/// <param name="ScanSeconds">Seconds spent finding the snapshot's pages and device state before anything changed: reading the index recorded
/// at save time, or reading the whole snapshot once.</param>
/// <param name="Index">Where the page index came from: <c>recorded</c> (saved with the snapshot by vmsnap) or <c>scanned</c>.</param>
/// <param name="IndexProblem">Why a recorded index was not used (stale, damaged), or null.</param>
public sealed record LivePostcopyResult(double? SecondsToResume, double SecondsToLastPage, long PagesOnDemand, long PagesStreamed, double ScanSeconds,
    string Index = "scanned", string? IndexProblem = null)
{
    /// <summary>True when this load resumed one that was cut off (QEMU's <c>postcopy-paused</c>): no drive was reverted, and
    /// <see cref="SecondsToResume"/> is null (the guest had started in the first load).</summary>
    public bool Resumed { get; init; }

    /// <summary>On a resume: the pages QEMU had received before the cut (not sent again).</summary>
    public long PagesAlreadyThere { get; init; }
}

/// <summary>What <see cref="LiveSnapshots.Recover"/> (or the start of a save or load) found of a killed live save, and what it did.</summary>
/// <param name="Found">True when a save had been killed on this QEMU (its record was there).</param>
/// <param name="Tag">That save's snapshot name.</param>
/// <param name="ProcessId">The killed vmsnap's process id.</param>
/// <param name="Stage">How far the save had come: <c>preparing</c> (QEMU had not begun sending), <c>migrating</c>,
/// <c>stopped</c> (QEMU had sent everything and released the images), <c>committed</c> (the snapshot was complete, the guest not
/// resumed), <c>resumed</c> (only the settings were left), <c>postcopy</c> (a <c>loadvm --postcopy</c> cut off, now resumed);
/// <c>none</c> when nothing was found.</param>
/// <param name="Snapshot">What became of its snapshot: <c>none</c> (on no drive), <c>kept</c> (complete on every drive),
/// <c>finished</c> (created on the drives that lacked it, the VM-state drive having it), <c>undone</c> (deleted from the drives that had
/// it), <c>partial</c> (on some drives, which QEMU holds again: see <see cref="Actions"/>).</param>
/// <param name="Resumed">True when the guest was resumed (it ran before the save).</param>
/// <param name="RestoredSettings">QEMU's migration parameters and capabilities put back to their values before the save.</param>
/// <param name="KeptSettings">Those someone changed after the save, left as they are.</param>
/// <param name="Actions">What was done, one sentence each.</param>
/// <param name="RunState">QEMU's run state afterwards.</param>
/// <param name="Description">What the kill had left, in a sentence.</param>
public sealed record LiveRecoveryResult(bool Found, string? Tag, int? ProcessId, string Stage, string Snapshot, bool Resumed,
    IReadOnlyList<string> RestoredSettings, IReadOnlyList<string> KeptSettings, IReadOnlyList<string> Actions, string RunState, string Description)
{
    /// <summary>One line: what the kill had left and what was done about it.</summary>
    public string Summary => Actions.Count == 0 ? Description : $"{Description}; {string.Join("; ", Actions)}";
}
