namespace Vmsnap.Migration;

/// <summary>A RAM block as a migration stream names it: its id string (e.g. <c>ram0</c>, <c>pc.bios</c>) and its length in bytes.</summary>
/// <param name="Id">The block's id string, as QEMU names it (<c>info ramblock</c>).</param>
/// <param name="Length">The block's length in bytes, a multiple of 4096.</param>
public sealed record RamBlockInfo(string Id, long Length);
