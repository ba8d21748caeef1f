using System.Buffers.Binary;
using System.Text;
using Vmsnap.Storage;
using Vmsnap.Storage.LowLevel;

namespace Vmsnap.Qcow2;

/// <summary>The bitmaps extension and its directory, read only as far as check needs: which clusters they use.</summary>
internal sealed record BitmapDirectory(uint Count, long DirectoryOffset, long DirectorySize, IReadOnlyList<BitmapDirectory.Entry> Entries)
{
    internal sealed record Entry(string Name, long TableOffset, uint TableSize, uint Flags, int GranularityBits);

    /// <summary>Entry flag: the bitmap was in use (not stored consistently) when the image was closed.</summary>
    internal const uint FlagInUse = 1u << 0;

    /// <summary>Entry flag: QEMU tracks writes in the bitmap while the image is open.</summary>
    internal const uint FlagAuto = 1u << 1;

    internal const ulong TableEntryOffsetMask = 0x00ff_ffff_ffff_fe00;
    private const int EntryFixedSize = 24;

    internal static (uint Count, long Offset, long Size) ParseExtension(ReadOnlySpan<byte> data) =>
        (BinaryPrimitives.ReadUInt32BigEndian(data),
         (long)BinaryPrimitives.ReadUInt64BigEndian(data[16..]),
         (long)BinaryPrimitives.ReadUInt64BigEndian(data[8..]));

    /// <summary>Reads the directory the extension points to.</summary>
    internal static BitmapDirectory Read(IBlockDevice device, ReadOnlySpan<byte> extension, long fileLength)
    {
        var (count, offset, size) = ParseExtension(extension);
        if (size < 0 || size > 64L << 20 || offset < 0 || offset + size > fileLength)
            throw new Qcow2FormatException("bitmap directory", offset, $"{size} bytes do not lie within the file ({fileLength} bytes)");
        byte[] dir = new byte[size];
        device.Read(dir, offset);
        var entries = new List<Entry>();
        int pos = 0;
        for (int i = 0; i < count; i++)
        {
            if (pos + EntryFixedSize > dir.Length)
                throw new Qcow2FormatException($"bitmap directory entry {i}", offset + pos, "truncated");
            ReadOnlySpan<byte> e = dir.AsSpan(pos);
            long tableOffset = (long)BinaryPrimitives.ReadUInt64BigEndian(e);
            uint tableSize = BinaryPrimitives.ReadUInt32BigEndian(e[8..]);
            uint flags = BinaryPrimitives.ReadUInt32BigEndian(e[12..]);
            int granularityBits = e[17];
            int nameSize = BinaryPrimitives.ReadUInt16BigEndian(e[18..]);
            uint extra = BinaryPrimitives.ReadUInt32BigEndian(e[20..]);
            long length = EntryFixedSize + (long)extra + nameSize;
            if (pos + length > dir.Length)
                throw new Qcow2FormatException($"bitmap directory entry {i}", offset + pos, "truncated");
            string name = Encoding.UTF8.GetString(e.Slice(EntryFixedSize + (int)extra, nameSize));
            entries.Add(new Entry(name, tableOffset, tableSize, flags, granularityBits));
            pos += (int)((length + 7) & ~7L);
        }
        return new BitmapDirectory(count, offset, size, entries);
    }
}
