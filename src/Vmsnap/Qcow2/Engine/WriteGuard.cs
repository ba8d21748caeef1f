namespace Vmsnap.Qcow2;

/// <summary>
/// Whether the image may be changed, checked before anything changes (<see cref="EnsureWritable"/>),
/// and what the first change does first (<see cref="BeforeFirstChange"/>).
/// </summary>
internal sealed class WriteGuard(Qcow2Header header, Qcow2File file, ImageHealth health, bool readOnly, DirtyRepair dirtyRepair)
{
    private bool _autoclearDone;

    /// <summary>True while the header names a backing file that is not open (writes would lose what it holds).</summary>
    internal bool BackingMissing { get; set; } = header.BackingFile is not null;

    /// <summary>
    /// What every change needs: a writable image that is not marked corrupt (in the header, or by a
    /// corruption found since it was opened), whose backing file is open and which has no persistent
    /// bitmaps vmsnap would leave stale; an image left dirty is repaired first, if that leaves it
    /// clean (<see cref="DirtyRepair"/>). Nothing else is written here: call it once the operation's
    /// own refusals are behind it.
    /// </summary>
    internal void EnsureWritable()
    {
        if (readOnly) throw new OperationRefusedException($"'{health.Path}' is open read-only");
        health.ThrowIfSwitchFailed();
        if (health.WritesStopped is { } stopped)
            throw health.RepairFirst("image", null, $"{stopped}, and the image was marked corrupt; nothing more is written until it is repaired");
        if (header.IsCorrupt)
            throw health.RepairFirst("header", Qcow2Header.IncompatibleFeaturesOffset,
                "the image is marked corrupt (incompatible feature 'corrupt bit'), so vmsnap only reads it");
        if (BackingMissing)
            throw new OperationRefusedException($"'{health.Path}' has a backing file that was not opened; writes are refused");
        if (header.FindExtension(HeaderExtension.Bitmaps) is not null && (header.AutoclearFeatures & Qcow2Header.AutoclearBitmaps) != 0)
            throw health.Corrupt("bitmaps extension", null,
                "the image has persistent dirty bitmaps, which vmsnap does not keep up to date; writing would make them wrong (remove them with 'qemu-img bitmap --remove')");
        if (health.Corruption is not null)
            throw health.RepairFirst("image", null, $"{health.Corruption}; a write could damage data, so vmsnap refuses it");
        dirtyRepair.RunIfPending();
    }

    /// <summary>Call once an operation has checked what it needs and is about to change the image: clears the autoclear bits vmsnap does not maintain (as QEMU does before its first write).</summary>
    internal void BeforeFirstChange()
    {
        if (_autoclearDone) return;
        ulong autoclear = header.AutoclearFeatures & Qcow2Header.AutoclearBitmaps;
        if (autoclear != header.AutoclearFeatures && header.Version >= 3)
        {
            header.AutoclearFeatures = autoclear;
            file.WriteHeader(Qcow2Header.EncodeUInt64(autoclear), Qcow2Header.AutoclearFeaturesOffset);
            file.Flush();
        }
        _autoclearDone = true;
    }
}
