using Vmsnap.Migration;
using Vmsnap.Storage;
using Vmsnap.VmState;

namespace Vmsnap.Tests.Migration;

/// <summary>Opens files and byte arrays as VM-state readers and writers for the migration tests.</summary>
internal static class StreamFiles
{
    public static T ReadFile<T>(string path, Func<VmStateReader, T> read)
    {
        using var device = FileBlockDevice.Open(path);
        using var backend = VmStateBackend.ForBlockDevice(device);
        using var reader = new VmStateReader(backend);
        return read(reader);
    }

    public static T ReadBytes<T>(byte[] bytes, Func<VmStateReader, T> read, int bufferSize = 1 << 20)
    {
        using var device = new MemoryBlockDevice(bytes);
        using var backend = VmStateBackend.ForBlockDevice(device);
        using var reader = new VmStateReader(backend, bufferSize);
        return read(reader);
    }

    public static T WriteFile<T>(string path, Func<VmStateWriter, T> write, VmStateWriteMode? mode = null)
    {
        using var device = FileBlockDevice.Open(path, new FileBlockDeviceOptions { Create = true });
        device.SetLength(0);
        using var backend = VmStateBackend.ForBlockDevice(device);
        using var writer = new VmStateWriter(backend, new VmStateWriterOptions { Mode = mode });
        T result = write(writer);
        writer.Close();
        return result;
    }

    public static (byte[] Bytes, T Result) WriteBytes<T>(Func<VmStateWriter, T> write, VmStateWriteMode? mode = null)
    {
        using var device = new MemoryBlockDevice();
        T result;
        using (var backend = VmStateBackend.ForBlockDevice(device))
        using (var writer = new VmStateWriter(backend, new VmStateWriterOptions { Mode = mode }))
        {
            result = write(writer);
            writer.Close();
        }
        return (device.ToArray(), result);
    }

    public static MigrationStreamInfo Inspect(string path) => ReadFile(path, r => MigrationStream.Inspect(r));

    public static MigrationStreamInfo ReadInto(string path, params (string Id, string File)[] ram)
    {
        using var sink = new RamFileSink(ram.Select(r => new KeyValuePair<string, string>(r.Id, r.File)));
        return ReadFile(path, r => MigrationStream.Read(r, sink));
    }

    public static KeyValuePair<string, string>[] Ram(params (string Id, string File)[] ram) =>
        ram.Select(r => new KeyValuePair<string, string>(r.Id, r.File)).ToArray();
}
