using Vmsnap.Migration.LowLevel;
using Vmsnap.Qcow2;
using Vmsnap.Qcow2.LowLevel;

namespace Vmsnap.Live;

/// <summary><c>loadvm --postcopy</c>: the page index vmsnap recorded with the snapshot, read instead of scanning the whole VM state.</summary>
internal sealed partial class LiveLoad
{
    /// <summary>
    /// The index recorded at save time (docs/postcopy-index.md), checked against the snapshot; null when the snapshot has
    /// none (QEMU's savevm, an older vmsnap) or it does not check out (<paramref name="problem"/> says why): then the caller scans.
    /// </summary>
    private static PostcopyIndex? RecordedPostcopyIndex(string imagePath, Qcow2Snapshot snapshot, out string? problem)
    {
        problem = null;
        using Qcow2Image image = Qcow2Image.Open(imagePath, new Qcow2OpenOptions { ForceShare = true });
        Qcow2Snapshot current = image.FindSnapshot(snapshot.Id) ?? snapshot;
        byte[] extra = image.GetSnapshotExtraData(current);
        if (!Migration.LowLevel.RecordedPostcopyIndex.HasPointer(extra)) return null;
        using Qcow2VmStateArea area = image.OpenVmStateAreaForReading(current, wholeArea: true);
        PostcopyIndex? index = Migration.LowLevel.RecordedPostcopyIndex.Load(extra, current.VmStateSize, area.Read, out problem);
        LiveTrace.Mark(index is null ? $"recorded index not used: {problem}" : "recorded index read");
        return index;
    }
}
