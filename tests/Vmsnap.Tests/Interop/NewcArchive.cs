using System.Text;

namespace Vmsnap.Tests.Interop;

/// <summary>
/// Writes a cpio archive in the "newc" format the Linux kernel unpacks as an initramfs: for each
/// entry a 110-byte ASCII header (magic 070701, then 13 eight-digit hex fields), the NUL-terminated
/// name padded to 4 bytes, the data padded to 4 bytes; a "TRAILER!!!" entry ends it.
/// </summary>
internal sealed class NewcArchive
{
    private readonly MemoryStream _out = new();
    private int _inode = 1;

    private const int Directory = 0x4000, Regular = 0x8000, CharDevice = 0x2000;

    /// <summary>A directory (its parents must have been added first).</summary>
    public void AddDirectory(string name, int mode = 0x1ed) => Entry(name, Directory | mode, [], 0, 0);

    /// <summary>A regular file with these bytes.</summary>
    public void AddFile(string name, ReadOnlySpan<byte> data, int mode = 0x1a4) => Entry(name, Regular | mode, data, 0, 0);

    /// <summary>A character device node (e.g. /dev/console, 5:1).</summary>
    public void AddCharDevice(string name, int major, int minor, int mode = 0x180) => Entry(name, CharDevice | mode, [], major, minor);

    /// <summary>The archive with its trailer.</summary>
    public byte[] ToArray()
    {
        Entry("TRAILER!!!", 0, [], 0, 0, inode: 0);
        return _out.ToArray();
    }

    private void Entry(string name, int mode, ReadOnlySpan<byte> data, int rdevMajor, int rdevMinor, int? inode = null)
    {
        byte[] nameBytes = Encoding.UTF8.GetBytes(name + "\0");
        var header = new StringBuilder("070701");
        foreach (long field in new long[]
        {
            inode ?? _inode++, mode, 0 /* uid */, 0 /* gid */, (mode & Directory) != 0 ? 2 : 1 /* nlink */, 0 /* mtime */,
            data.Length, 0, 0 /* dev major, minor */, rdevMajor, rdevMinor, nameBytes.Length, 0 /* check */,
        })
            header.Append(field.ToString("x8"));
        _out.Write(Encoding.ASCII.GetBytes(header.ToString()));
        _out.Write(nameBytes);
        Pad();
        _out.Write(data);
        Pad();
    }

    private void Pad()
    {
        while (_out.Length % 4 != 0) _out.WriteByte(0);
    }
}
