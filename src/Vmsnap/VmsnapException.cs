namespace Vmsnap;

/// <summary>
/// Base type of every error vmsnap reports about its input, its I/O or QEMU: the message says what is
/// wrong and where (file offset, table, snapshot), so a caller can print it as it is. Catch a derived
/// type to tell the cases apart: <see cref="Storage.ImageInUseException"/>, <see cref="Qcow2.SnapshotNotFoundException"/>,
/// <see cref="Qcow2.SnapshotExistsException"/>, <see cref="OperationRefusedException"/>, <see cref="Qcow2.Qcow2FormatException"/>
/// (with its file offset), <see cref="Migration.MigrationStreamException"/> (with its stream offset),
/// <see cref="VmState.VmStateException"/>, <see cref="Storage.StorageException"/> and <see cref="Live.QmpException"/>.
/// </summary>
public abstract class VmsnapException : Exception
{
    /// <summary>Creates the error with a message that names the problem.</summary>
    protected VmsnapException(string message) : base(message) { }

    /// <summary>Creates the error with a message and the failure that caused it.</summary>
    protected VmsnapException(string message, Exception? inner) : base(message, inner) { }
}
