using Vmsnap.Migration;
using Vmsnap.Snapshots;
using Vmsnap.VmState;

namespace Vmsnap.Tests;

/// <summary>Entry points only tests need, built on the library's internal seams (they used to live in the library).</summary>
internal static class TestHooks
{
    /// <summary>As <see cref="VmSnapshots.Save"/>, with the VM-state area's backend wrapped (fault injection).</summary>
    internal static VmSnapshotResult SaveThrough(string imagePath, string name, MachineProfile profile, VmSnapshotOptions options,
        Func<VmStateBackend, VmStateBackend> wrapBackend, CancellationToken cancellationToken = default) =>
        VmSnapshots.WriteSnapshot(imagePath, name, options, writer => MigrationStream.Write(writer, profile, null, cancellationToken), wrapBackend);

    /// <summary>As <see cref="MigrationStream.Write"/> with chosen RAM part and chunk sizes.</summary>
    internal static MigrationStreamInfo WriteInParts(VmStateWriter destination, MachineProfile profile, long partBytes, int chunkBytes,
        IProgress<long>? ramBytesDone = null, CancellationToken cancellationToken = default) =>
        new MigrationStreamWriter(destination, ramBytesDone, cancellationToken, partBytes, chunkBytes).Write(profile);
}
