namespace Vmsnap.Qcow2;

/// <summary>
/// The kinds of qcow2 metadata, as QEMU's overlap check names them (QCow2MetadataOverlap, same bits
/// and order): what a write declares it may overwrite, and what the check looks for.
/// </summary>
[Flags]
internal enum Qcow2Metadata
{
    None = 0,
    MainHeader = 1 << 0,
    ActiveL1 = 1 << 1,
    ActiveL2 = 1 << 2,
    RefcountTable = 1 << 3,
    RefcountBlock = 1 << 4,
    SnapshotTable = 1 << 5,
    InactiveL1 = 1 << 6,
    InactiveL2 = 1 << 7,
    BitmapDirectory = 1 << 8,
}
