using Kind = Vmsnap.Qcow2.Qcow2CheckFindingKind;

namespace Vmsnap.Qcow2;

/// <summary>The parts of an open image a check reads and repairs.</summary>
/// <param name="File">The image file.</param>
/// <param name="Header">The header (the check clears its dirty and corrupt bits, and may move the tables it points to).</param>
/// <param name="Geometry">The image's geometry.</param>
/// <param name="ReadOnly">True when nothing may be repaired.</param>
/// <param name="ActiveL1">The active L1 table (COPIED flags repaired in place).</param>
/// <param name="L2Cache">Cached L2 tables (dropped when tables were rewritten directly).</param>
/// <param name="Refcounts">The refcounts compared and repaired.</param>
/// <param name="Caches">Flushed before the check and after repairs.</param>
/// <param name="Snapshots">The snapshot list (replaced by what the check reads, when it repairs).</param>
/// <param name="Overlaps">What repair writes are checked against first.</param>
internal sealed record CheckedImage(Qcow2File File, Qcow2Header Header, ClusterGeometry Geometry, bool ReadOnly, L1Table ActiveL1,
    MetadataCache L2Cache, RefcountManager Refcounts, MetadataCaches Caches, SnapshotList Snapshots, MetadataOverlap Overlaps);

/// <summary>
/// Consistency check and repair, done the way <c>qemu-img check</c> does them (QEMU 7.2; the check
/// is unchanged through 10.2), so that both tools count the same findings and repair the same
/// things: first the snapshot table is read, tolerating (and with --repair all dropping) what QEMU
/// tolerates; then reference counts are rebuilt in memory from every structure that uses clusters
/// and compared with the stored ones (leaks freed, wrong counts set, the refcount structure rebuilt,
/// unaligned zero clusters made plain zero clusters); COPIED flags of the active tables are compared
/// with the stored refcounts; a damaged snapshot table is written anew; a repaired image loses its
/// dirty and corrupt bits. The parts live in Qcow2Checker.*.cs beside this file. Runs under the
/// engine's lock with its caches flushed.
/// </summary>
internal sealed partial class Qcow2Checker
{
    /// <summary>What one part of the check found and fixed (QEMU keeps the snapshot part apart from the refcount part).</summary>
    private sealed class Tally
    {
        internal int Corruptions, Leaks, CheckErrors, CorruptionsFixed, LeaksFixed;

        internal Tally Copy() => (Tally)MemberwiseClone();
    }

    /// <summary>The check cannot go on; qemu-img then prints "Check failed" and no figures.</summary>
    private sealed class CheckFailedException(string reason) : Exception(reason);

    private readonly Qcow2File _file;
    private readonly Qcow2Header _header;
    private readonly bool _readOnly;
    private readonly L1Table _activeL1;
    private readonly MetadataCache _l2Cache;
    private readonly RefcountManager _refcounts;
    private readonly MetadataCaches _caches;
    private readonly SnapshotList _snapshotList;
    private readonly MetadataOverlap _overlaps;
    private readonly ClusterGeometry _g;
    private readonly Qcow2RepairMode _mode;
    private readonly List<Qcow2CheckFinding> _findings = [];
    private readonly Tally _snapshotRes = new();
    private Tally _res = new();   // the refcount part; replaced while comparisons are tried and redone
    private bool _signaledCorruption;
    private bool _incompleteEntriesAreCorrupt = true;
    private bool _madeCorrupt;   // this check set the corrupt bit: a repair write would have hit metadata

    private Qcow2Checker(CheckedImage image, Qcow2RepairMode mode)
    {
        _file = image.File;
        _header = image.Header;
        _readOnly = image.ReadOnly;
        _activeL1 = image.ActiveL1;
        _l2Cache = image.L2Cache;
        _refcounts = image.Refcounts;
        _caches = image.Caches;
        _snapshotList = image.Snapshots;
        _overlaps = image.Overlaps;
        _g = image.Geometry;
        _mode = image.ReadOnly ? Qcow2RepairMode.None : mode;
    }

    private Qcow2Header H => _header;
    private int ClusterSize => _g.ClusterSize;
    private bool FixErrors => _mode == Qcow2RepairMode.All;
    private bool FixLeaks => _mode != Qcow2RepairMode.None;

    /// <summary>Checks, repairs what <paramref name="mode"/> allows, and (after repairs) checks again like qemu-img does.</summary>
    internal static Qcow2CheckResult Run(CheckedImage image, Qcow2RepairMode mode) => Run(image, mode, out _, forWrites: false);

    /// <summary>
    /// The check the engine runs before it writes: like <see cref="Run(CheckedImage, Qcow2RepairMode)"/>,
    /// but version 3 snapshot table entries without the disk size do not count as corruptions
    /// (they do not make writes unsafe, and QEMU writes such images too; a table written anew gets
    /// complete entries). Also returns the host clusters that more than one entry of the active L2
    /// tables references (legal once their refcount says so).
    /// </summary>
    internal static Qcow2CheckResult Run(CheckedImage image, Qcow2RepairMode mode, out IReadOnlySet<long> activeDuplicates) =>
        Run(image, mode, out activeDuplicates, forWrites: true);

    private static Qcow2CheckResult Run(CheckedImage image, Qcow2RepairMode mode, out IReadOnlySet<long> activeDuplicates, bool forWrites)
    {
        var first = new Qcow2Checker(image, mode) { _incompleteEntriesAreCorrupt = !forWrites };
        Qcow2CheckResult result = first.Execute();
        activeDuplicates = first._activeDuplicates;
        // qemu-img checks a repaired image once more and reports that, with the numbers repaired.
        if (result.Failure is null && result.CorruptionsFixed + result.LeaksFixed > 0)
        {
            // QEMU cannot use an image it marked corrupt during the repair: its second check fails.
            if (first._madeCorrupt)
            {
                const string reason = "the image was marked corrupt during the repair (a write would have hit metadata), so it cannot be checked again";
                return result with { Failure = reason, CheckErrors = Math.Max(1, result.CheckErrors), Findings = [.. result.Findings, new Qcow2CheckFinding(Kind.Failure, $"Check failed: {reason}")] };
            }
            var second = new Qcow2Checker(image, Qcow2RepairMode.None) { _incompleteEntriesAreCorrupt = !forWrites };
            Qcow2CheckResult again = second.Execute();
            activeDuplicates = second._activeDuplicates;
            result = again with
            {
                CorruptionsFixed = result.CorruptionsFixed,
                LeaksFixed = result.LeaksFixed,
                Findings = [.. result.Findings, .. again.Findings],
            };
        }
        return result;
    }

    /// <summary>One check (QEMU's qcow2_co_check_locked): snapshot table, refcounts, snapshot table repair, clean bits.</summary>
    /// <summary>Adds a line to the report.</summary>
    private void Report(Kind kind, string text) => _findings.Add(new Qcow2CheckFinding(kind, text));

    /// <summary>A finding a repair mends ("Repairing ...") or that stays ("ERROR ..."), as qemu-img words the two.</summary>
    private void RepairingOrError(bool repairing, string what) =>
        Report(repairing ? Kind.Repair : Kind.Error, (repairing ? "Repairing " : "ERROR ") + what);

    private Qcow2CheckResult Execute()
    {
        if (!_readOnly) _caches.FlushAll();
        string? failure = null;
        try
        {
            CheckReadSnapshotTable();
            CheckRefcounts();
            FixSnapshotTable();
            if (_mode != Qcow2RepairMode.None && _snapshotRes.CheckErrors + _res.CheckErrors == 0 && _snapshotRes.Corruptions + _res.Corruptions == 0)
                MarkCleanAndConsistent();
        }
        catch (CheckFailedException e)
        {
            failure = e.Message;
            Report(Kind.Failure, $"Check failed: {failure}");
        }
        finally
        {
            _counts = new ReferenceCounts(0);   // let it go before a second check counts again
            if (_madeCorrupt) DiscardPendingMetadata();
            else if (_mode != Qcow2RepairMode.None) FinishRepairs();
        }
        int checkErrors = _snapshotRes.CheckErrors + _res.CheckErrors;
        return new Qcow2CheckResult
        {
            Corruptions = _snapshotRes.Corruptions + _res.Corruptions,
            Leaks = _snapshotRes.Leaks + _res.Leaks,
            CheckErrors = failure is null ? checkErrors : Math.Max(1, checkErrors),
            CorruptionsFixed = _snapshotRes.CorruptionsFixed + _res.CorruptionsFixed,
            LeaksFixed = _snapshotRes.LeaksFixed + _res.LeaksFixed,
            TotalClusters = _totalClusters,
            AllocatedClusters = _allocated,
            FragmentedClusters = _fragmented,
            CompressedClusters = _compressed,
            ImageEndOffset = _imageEnd,
            Findings = _findings.ToArray(),
            Failure = failure,
        };
    }

    /// <summary>
    /// Makes what the repairs changed durable and drops cached tables they may have written around.
    /// The refcounts on disk are now what the check left them, so the dirty bit goes, as QEMU
    /// clears it when it closes an image it had open for writing.
    /// </summary>
    private void FinishRepairs()
    {
        _caches.FlushAll();
        _file.Flush();
        _l2Cache.Clear();   // clean after the flush; L2 tables may have been rewritten directly
        if (H.Version >= 3 && H.IsDirty)
        {
            H.IncompatibleFeatures &= ~Qcow2Header.IncompatibleDirty;
            _file.WriteHeader(Qcow2Header.EncodeUInt64(H.IncompatibleFeatures), Qcow2Header.IncompatibleFeaturesOffset);
            _file.Flush();
        }
        // A writer clears the autoclear bits of features it does not know (QEMU does on its writable
        // open). Only those 8 bytes: QEMU 7.2 rewrites its whole header then, and in check mode that
        // header says "no snapshots", which loses them; vmsnap keeps them.
        const ulong known = Qcow2Header.AutoclearBitmaps | Qcow2Header.AutoclearRawExternalData;
        if (H.Version >= 3 && (H.AutoclearFeatures & ~known) != 0)
        {
            H.AutoclearFeatures &= known;
            _file.WriteHeader(Qcow2Header.EncodeUInt64(H.AutoclearFeatures), Qcow2Header.AutoclearFeaturesOffset);
            _file.Flush();
        }
    }

    /// <summary>
    /// After the image was marked corrupt, QEMU writes nothing more of what its caches hold (the
    /// image is unusable until repaired): cached refcount and L2 changes are dropped, not written.
    /// </summary>
    private void DiscardPendingMetadata()
    {
        _refcounts.Reload(RefcountTable.Read(_file.Device, H));
        _l2Cache.Clear();
        _file.Flush();
    }

    // ---- reading and writing the file the way QEMU's check does ---------------------------------

    /// <summary>QEMU refuses requests past this offset (BDRV_MAX_LENGTH); below it, bytes past the end of the file read as zeroes.</summary>
    private const long MaxRequestEnd = long.MaxValue - (1L << 30) + 1;

    /// <summary>Fills <paramref name="buffer"/> from any offset; false when QEMU's block layer would refuse the request.</summary>
    private bool TryRead(long offset, Span<byte> buffer)
    {
        if (offset < 0 || offset > MaxRequestEnd - buffer.Length) return false;
        long fileLength = _file.Device.Length;
        int n = offset < fileLength ? _file.Device.Read(buffer, offset) : 0;
        if (n < buffer.Length) buffer[n..].Clear();
        return true;
    }

    private byte[]? TryRead(long offset, long length)
    {
        if (length > Array.MaxLength) return null;
        byte[] data = new byte[length];
        return TryRead(offset, data) ? data : null;
    }

    /// <summary>
    /// QEMU's qcow2_signal_corruption: on an image open for repair the corrupt bit is set (once);
    /// otherwise only a message.
    /// </summary>
    private void SignalCorruption(string what)
    {
        bool fatal = _mode != Qcow2RepairMode.None;
        if (_signaledCorruption && (!fatal || H.IsCorrupt)) return;
        Report(Kind.Note, fatal
            ? $"qcow2: Marking image as corrupt: {what}; further corruption events will be suppressed"
            : $"qcow2: Image is corrupt: {what}; further non-fatal corruption events will be suppressed");
        if (fatal) _madeCorrupt = true;
        if (fatal && H.Version >= 3 && !H.IsCorrupt)
        {
            H.IncompatibleFeatures |= Qcow2Header.IncompatibleCorrupt;
            _file.WriteHeader(Qcow2Header.EncodeUInt64(H.IncompatibleFeatures), Qcow2Header.IncompatibleFeaturesOffset);
            _file.Flush();
        }
        _signaledCorruption = true;
    }

    /// <summary>QEMU's qcow2_mark_clean and qcow2_mark_consistent: a repaired image is neither dirty nor corrupt.</summary>
    private void MarkCleanAndConsistent()
    {
        ulong bits = Qcow2Header.IncompatibleDirty | Qcow2Header.IncompatibleCorrupt;
        if (H.Version < 3 || (H.IncompatibleFeatures & bits) == 0) return;
        _caches.FlushAll();
        _file.Flush();
        H.IncompatibleFeatures &= ~bits;
        _file.WriteHeader(Qcow2Header.EncodeUInt64(H.IncompatibleFeatures), Qcow2Header.IncompatibleFeaturesOffset);
        _file.Flush();
    }
}
